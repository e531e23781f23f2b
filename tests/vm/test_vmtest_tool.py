"""tools/vmtest itself: how it quotes the guest command, how it reports a
failing stage and a hang, and its setup errors (these need no VM)."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys

import pytest

from .conftest import VMTEST

_loader = importlib.machinery.SourceFileLoader("vmtest_tool", VMTEST)
_spec = importlib.util.spec_from_loader("vmtest_tool", _loader)
vmtest = importlib.util.module_from_spec(_spec)
_loader.exec_module(vmtest)


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, VMTEST, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout, universal_newlines=True)


@pytest.mark.parametrize("argv, expected", [
    (["python3", "-m", "pytest", "-q"], "python3 -m pytest -q"),
    (["echo", "two words"], 'echo "two words"'),
    (["echo", "$LIVEUPDATE_VM_OUT/x.xml"], "echo $LIVEUPDATE_VM_OUT/x.xml"),
    (["echo", 'say "hi" `now` \\'], 'echo "say \\"hi\\" \\`now\\` \\\\"'),
    (["echo", "a;b", "*"], 'echo "a;b" "*"'),
    (["exit 3; echo never"], "exit 3; echo never"),  # one argument: a shell line
])
def test_guest_command_quoting(argv, expected) -> None:
    assert vmtest.guest_command(argv) == expected


def test_quoted_arguments_reach_the_guest_shell_intact() -> None:
    # What the guest's sh makes of the quoting, checked with the host's sh.
    argv = ["printf", "%s|", "two words", 'q"uote', "back`tick", "semi;colon", "$HOME"]
    out = subprocess.run(["sh", "-c", vmtest.guest_command(argv)], stdout=subprocess.PIPE,
                         env={"HOME": "/home/x", "PATH": "/usr/bin:/bin"}, universal_newlines=True)
    assert out.stdout == 'two words|q"uote|back`tick|semi;colon|/home/x|'


def test_missing_kernel_is_a_setup_error() -> None:
    proc = run_tool("--kernel", "/nonexistent/bzImage", "--", "true")
    assert proc.returncode == 2, proc.stdout
    assert "vmtest: error: kernel image /nonexistent/bzImage: no such file" in proc.stdout


def test_missing_command_is_a_setup_error(tmp_path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"not a kernel")
    proc = run_tool("--kernel", str(kernel), "--qemu", sys.executable)
    assert proc.returncode == 2, proc.stdout
    assert "no command" in proc.stdout


def test_failing_stage_is_reported_with_its_status_and_log(run_vm) -> None:
    result = run_vm("echo marker-from-the-guest; exit 3", timeout=240)
    assert result.returncode == 1, result.explain()
    assert "FAILED (stage 1: exit 3)" in result.output
    assert "marker-from-the-guest" in result.output  # the serial log's tail


def test_hang_ends_in_a_timeout(run_vm) -> None:
    result = run_vm("sleep 100000", timeout=25)
    assert result.returncode == 124, result.explain()
    assert "TIMEOUT after 25s" in result.output
    assert "QEMU killed" in result.output


def test_stage2_runs_in_the_kernel_started_by_kexec(run_vm) -> None:
    result = run_vm("echo $LIVEUPDATE_STAGE $LIVEUPDATE_VM_KEXEC > $LIVEUPDATE_VM_OUT/one",
                    stage2="test -e /sys/kernel/debug/kho/in && echo $LIVEUPDATE_STAGE > $LIVEUPDATE_VM_OUT/two",
                    timeout=240)
    assert result.returncode == 0, result.explain()
    assert result.file("one").split() == ["1", "1"]
    assert result.file("two").split() == ["2"]
