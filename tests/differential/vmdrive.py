"""Run traces in the real kernel through ``tools/vmtest``: one boot, one kexec.

The host writes the traces to a JSON file (the guest sees the host's root
read-only, so it reads the file in place), ``tools/vmtest`` boots the LUO
kernel and runs :mod:`.guest` ``stage1`` (all traces up to their kexec,
then a real kexec by the guest process itself while it holds its sessions)
and ``stage2`` (the rest on the device, then all traces on the emulator in
the same kernel). The outcomes come back through vmtest's ``--out``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMTEST = os.path.join(REPO, "tools", "vmtest")
SHARED_VM = os.path.join(os.path.dirname(REPO), "shared", "vm")
GUEST = "tests/differential/guest.py"


def kernel_image() -> Optional[str]:
    path = os.environ.get("LIVEUPDATE_VM_KERNEL") or os.path.join(SHARED_VM, "bzImage")
    return path if os.path.isfile(path) else None


def missing_requirement() -> Optional[str]:
    """Why the VM cannot run here, or None."""
    if kernel_image() is None:
        return ("no LUO kernel image (set LIVEUPDATE_VM_KERNEL or put one at %s)"
                % os.path.join(SHARED_VM, "bzImage"))
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is missing; run tools/vm/install-deps.sh"
    if not os.path.exists(VMTEST):
        return "tools/vmtest is missing"
    return None


def _read_lines(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class VmResult:
    returncode: int
    output: str
    device: List[Dict[str, Any]] = field(default_factory=list)
    emulator: List[Dict[str, Any]] = field(default_factory=list)
    timing: Dict[str, float] = field(default_factory=dict)
    out: str = ""

    def explain(self) -> str:
        return "(vmtest exit %d)\n%s" % (self.returncode, self.output[-6000:])


def run(entries: List[Dict[str, Any]], workdir: str, timeout: int = 420) -> VmResult:
    """Run ``entries`` (``{"no", "seed", "ops"}`` dicts) in one VM boot."""
    os.makedirs(workdir, exist_ok=True)
    traces_file = os.path.join(os.path.abspath(workdir), "traces.json")
    with open(traces_file, "w", encoding="utf-8") as f:
        json.dump({"traces": entries}, f)
    out = os.path.join(workdir, "vm-out")
    stage = "python3 %s %%s --traces %s" % (GUEST, traces_file)
    argv = [sys.executable, VMTEST, "--kernel", kernel_image() or "", "--timeout", str(timeout),
            "--out", out, "--python", sys.executable,
            "--stage2", stage % "stage2", "--", stage % "stage1"]
    # The VM tier's runner: it echoes vmtest's progress lines as the guest goes.
    from vm.conftest import run_vmtest

    proc = run_vmtest(argv, timeout=timeout + 60)
    result = VmResult(proc.returncode, proc.stdout.decode("utf-8", "replace"), out=out)
    result.device = _read_lines(os.path.join(out, "device.jsonl"))
    result.emulator = _read_lines(os.path.join(out, "emulator.jsonl"))
    try:
        with open(os.path.join(out, "timing.json"), encoding="utf-8") as f:
            result.timing = json.load(f)
    except (OSError, ValueError):
        pass
    return result
