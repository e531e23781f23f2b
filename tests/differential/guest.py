"""Guest side of the differential test (run by ``tools/vmtest``).

    guest.py stage1 --traces FILE     # in the first kernel
    guest.py stage2 --traces FILE     # in the kernel the kexec started

``FILE`` is the JSON the host wrote (``{"traces": [{"no", "seed", "ops"}]}``);
the guest reads it through the read-only root. Stage 1 runs every trace up
to its kexec op on ``/dev/liveupdate``, keeps everything open, writes its
outcomes and ``stage1.rc``, and kexecs by itself (kexec_file_load of the
same kernel, same command line), so the sessions it holds are handed over.
Stage 2 runs the rest of every trace on the device, then every trace from
the top on a fresh emulator in this same kernel (the emulator leans on
the host kernel for memfds and file types: the same kernel for both sides
keeps the comparison about Live Update alone). Outcomes go to
``$LIVEUPDATE_VM_OUT/device.jsonl`` and ``emulator.jsonl``; the host
compares them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import liveupdate  # noqa: E402
from tests.differential import runner  # noqa: E402


def load(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["traces"]


def write_lines(path: str, records: list, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_timing(out: str, key: str, seconds: float) -> None:
    path = os.path.join(out, "timing.json")
    try:
        with open(path, encoding="utf-8") as f:
            timing = json.load(f)
    except (OSError, ValueError):
        timing = {}
    timing[key] = round(seconds, 2)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(timing, f)


def device_runners(traces: list) -> list:
    open_device = lambda: liveupdate.open(backend="device")  # noqa: E731
    return [runner.TraceRunner(t["no"], t["ops"], open_device) for t in traces]


def stage1(traces: list, out: str) -> int:
    start = time.monotonic()
    runners = device_runners(traces)
    records = runner.run_stage(runners, 1)
    write_lines(os.path.join(out, "device.jsonl"), records)
    write_timing(out, "device_stage1_s", time.monotonic() - start)
    print("differential: stage 1 ran %d ops on the device in %.1f s; kexec with the sessions held"
          % (len(records), time.monotonic() - start), flush=True)
    from liveupdate import kexec

    kexec.load(os.environ["LIVEUPDATE_VM_KERNEL"], reuse_cmdline=True)
    # Written last: stage1.rc means everything before the jump succeeded.
    with open(os.path.join(out, "stage1.rc"), "w") as f:
        f.write("0\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # ``runners`` holds every session and file until the machine is gone.
    kexec.execute()
    return 1  # only reached if the kexec failed (execute raises then)


def stage2(traces: list, out: str) -> int:
    start = time.monotonic()
    runners = device_runners(traces)
    for r, t in zip(runners, traces):
        r.pos = runner.kexec_index(t["ops"]) + 1
    records = runner.run_stage(runners, 2)
    write_lines(os.path.join(out, "device.jsonl"), records, "a")
    write_timing(out, "device_stage2_s", time.monotonic() - start)
    print("differential: stage 2 ran %d ops on the device in %.1f s" % (len(records), time.monotonic() - start),
          flush=True)
    start = time.monotonic()
    emulated = runner.run_emulator([t["ops"] for t in traces], [t["no"] for t in traces])
    write_lines(os.path.join(out, "emulator.jsonl"), emulated)
    write_timing(out, "emulator_s", time.monotonic() - start)
    print("differential: %d ops on the emulator in %.1f s" % (len(emulated), time.monotonic() - start),
          flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("--traces", required=True)
    p.add_argument("--out", default=os.environ.get("LIVEUPDATE_VM_OUT", "."))
    args = p.parse_args(argv)
    traces = load(args.traces)
    try:
        if args.stage == "stage1":
            return stage1(traces, args.out)
        return stage2(traces, args.out)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())
