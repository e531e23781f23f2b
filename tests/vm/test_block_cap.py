"""The session block cap: the create that first gets ENOSPC is the same on
the real kernel and on the emulator.

kernel/liveupdate/luo_session.c keeps outgoing sessions in a kho_block
chain that grows *before* each insert (luo_session_insert ->
kho_block_set_grow(count + 1)); kernel/liveupdate/kho_block.c refuses a
10,001st block (KHO_MAX_BLOCKS = 10000) with ENOSPC. A block is a 4 KiB page
with a 16-byte header and 80-byte entries (struct luo_session_ser: a 64-byte
name and a 16-byte file-set header), so 51 sessions a block: creates
#0..#509,999 succeed and create #510,000 (0-based) is the first ENOSPC.
After it, the failure is sticky (the chain is unchanged), and closing one
session makes room for exactly one create (its entry leaves the last
block, which stays because it is still needed: 509,999 entries need 10,000
blocks).

Cost: every create also compares the new name with every outgoing
session's (a list walk, before the cap is reached), so the run is
quadratic: 5,041 s of TCG for the 510,000 creates on this project's
machines (100,000 in 127 s, 300,000 in 1,154 s) plus the emulator half in
the same guest (228 s) (two host fds per emulated session: RLIMIT_NOFILE and
fs.nr_open are raised in the guest, where the test is root with every
capability; the host's container cannot raise its hard limit). Far over
CI's budget, so it is ``slow`` and runs only when asked:

    LIVEUPDATE_SLOW=1 python -m pytest tests/vm/test_block_cap.py -m slow
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import OUTER_MARGIN_S, REPO, require_vm

VMTEST = os.path.join(REPO, "tools", "vmtest")
GUEST = "tests/differential/block_cap_guest.py"
EXPECTED_INDEX = ((4096 - 16) // 80) * 10000  # 510,000
TIMEOUT_S = 3 * 3600

pytestmark = pytest.mark.slow


def test_first_enospc_create_is_the_same_on_kernel_and_emulator(tmp_path, guest_summary) -> None:
    if not os.environ.get("LIVEUPDATE_SLOW"):
        pytest.skip("about 1.5 hours of TCG (half a million sessions, quadratic in the kernel): "
                    "set LIVEUPDATE_SLOW=1 to run it")
    kernel = require_vm()
    out = str(tmp_path / "out")
    # The device half first, in its own process: its exit releases every
    # session before the emulator half needs the memory and the fds.
    command = ("python3 %s --backend device --out $LIVEUPDATE_VM_OUT/device.json && "
               "python3 %s --backend emulator --out $LIVEUPDATE_VM_OUT/emulator.json" % (GUEST, GUEST))
    argv = [sys.executable, VMTEST, "--kernel", kernel, "--timeout", str(TIMEOUT_S), "--memory", "4G",
            # No speculation mitigations: the guest's syscalls and the
            # kernel's list walk run about 1.5x faster under TCG.
            "--append", "mitigations=off", "--out", out, "--python", sys.executable, "--", command]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=TIMEOUT_S + OUTER_MARGIN_S)
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, output[-6000:]
    results = {}
    for backend in ("device", "emulator"):
        with open(os.path.join(out, backend + ".json"), encoding="utf-8") as f:
            results[backend] = json.load(f)
        r = results[backend]
        guest_summary("block cap on the %s: create #%s failed with %s after %.0f s; retry: %s; "
                      "after closing one: %s" % (backend, r["failed_index"], r["errname"], r["seconds"],
                                                 r.get("retry"), r.get("after_close")))
    device, emulator = results["device"], results["emulator"]
    assert device["errname"] == "ENOSPC" and device["failed_index"] == EXPECTED_INDEX, device
    for key in ("failed_index", "errname", "retry", "after_close"):
        assert emulator[key] == device[key], (key, emulator, device)
