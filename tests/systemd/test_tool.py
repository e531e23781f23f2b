"""tools/vmtest --systemd itself: a failing stage brings back the serial log
and the guest's journal, with the failure in one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import SHARED_VM, VMTEST, _cannot_run


@pytest.mark.vm
def test_a_failing_stage_brings_back_the_journal(tmp_path) -> None:
    kernel = os.environ.get("LIVEUPDATE_VM_KERNEL") or os.path.join(SHARED_VM, "bzImage")
    if not os.path.isfile(kernel):
        pytest.skip("no LUO kernel image")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("mmdebstrap") is None or os.geteuid() != 0:
        _cannot_run("needs QEMU, mmdebstrap and root (tools/vm/install-deps.sh, as root)")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, VMTEST, "--systemd", "--kernel", kernel, "--timeout", "900",
                           "--out", str(out), "--", "echo about to fail; systemctl --version | head -1; exit 3"],
                          capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "vmtest: FAILED (stage 1: exit 3)" in proc.stderr
    assert "the guest's journal:" in proc.stderr and "journal-stage1.txt" in proc.stderr
    journal = (out / "journal-stage1.txt").read_text(errors="replace")
    assert "about to fail" in journal and "systemd 26" in journal
    assert (out / "serial.log").exists()
    for line in ("systemd guest image", "booting", "stage 1 running", "stage 1 exited 3", "collecting results"):
        assert line in proc.stdout, (line, proc.stdout)
