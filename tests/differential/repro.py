"""Replay one differential trace, or a few of its operations.

    python3 tests/differential/repro.py --seed 3 --trace 2              # the whole trace, emulator
    python3 tests/differential/repro.py --seed 3 --trace 2 --ops 0,5,9  # those ops only
    python3 tests/differential/repro.py --seed 3 --trace 2 --ops 0,5,9 --vm   # and on the device

``--trace`` is the trace's number in its run (it fixes the session-name
prefix); the mismatch report prints both numbers. With ``--vm`` the ops
also run on the real kernel in QEMU (one boot, one kexec) and the two
outcomes are printed side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.differential import compare, runner, trace, vmdrive  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--trace", type=int, default=0, help="the trace's number in its run")
    p.add_argument("--length", type=int, default=trace.OPS_PER_TRACE)
    p.add_argument("--ops", help="comma-separated op indices to keep (default: all)")
    p.add_argument("--vm", action="store_true", help="also run on the device in the VM")
    args = p.parse_args(argv)
    ops = trace.generate(args.seed, args.trace, args.length)
    indices = [int(x) for x in args.ops.split(",")] if args.ops else list(range(len(ops)))
    sub = compare.subtrace(ops, indices)
    emulated = runner.run_emulator([sub], [args.trace])
    device = None
    if args.vm:
        why = vmdrive.missing_requirement()
        if why:
            print("repro: cannot run the VM: " + why, file=sys.stderr)
            return 2
        res = vmdrive.run([{"no": args.trace, "seed": args.seed, "ops": sub}], tempfile.mkdtemp(prefix="luo-repro-"))
        if res.returncode != 0:
            print(res.explain(), file=sys.stderr)
        device = compare.by_key(res.device)
    differ = 0
    for rec, original in zip(emulated, indices):
        print("[%3d] %s" % (original, json.dumps(sub[rec["i"]], sort_keys=True)))
        print("      emulator: %s" % json.dumps(rec["out"], sort_keys=True))
        if device is not None:
            dev = device.get((rec["trace"], rec["i"]), {}).get("out")
            if dev != rec["out"]:
                differ += 1
                print("   !! device  : %s" % json.dumps(dev, sort_keys=True))
    if device is not None:
        print("repro: %d of %d ops differ between the device and the emulator" % (differ, len(emulated)))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
