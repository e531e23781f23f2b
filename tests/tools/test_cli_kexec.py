"""liveupdate.kexec and ``liveupdate kexec``: dry runs and refusals only.

Nothing here loads or starts a kernel on this host: the real calls are made
only by a child that dropped every privilege first (and checked it did), so
the kernel refuses them before doing anything.
"""
from __future__ import annotations

import errno
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from typing import Any, Callable, Dict, List, Tuple

import pytest

from liveupdate import kexec
from liveupdate.cli import main
from . import child_report

CAP_SYS_BOOT = 22
NOBODY = 65534


def run_cli(argv: List[str]) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def kernel_file(tmp_path) -> str:
    path = tmp_path / "bzImage"
    path.write_bytes(b"MZ not really a kernel")
    return str(path)


def numbers() -> Tuple[int, int]:
    return kexec.syscall_numbers()


needs_known_arch = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "aarch64"), reason="syscall numbers are known for x86_64 and aarch64 only"
)

# -- plans -----------------------------------------------------------------


def test_syscall_numbers_per_architecture() -> None:
    assert kexec.syscall_numbers("x86_64") == (320, 169)
    assert kexec.syscall_numbers("aarch64") == (294, 142)
    with pytest.raises(OSError) as info:
        kexec.syscall_numbers("riscv64")
    assert info.value.errno == errno.ENOSYS
    assert "riscv64" in str(info.value)


def test_plan_load_spells_out_every_argument(kernel_file: str) -> None:
    call = kexec.plan_load(kernel_file, cmdline="console=ttyS0 liveupdate=on", machine="aarch64")
    assert call.name == "kexec_file_load" and call.number == 294
    assert call.argument("cmdline_len") == len("console=ttyS0 liveupdate=on") + 1  # the NUL counts
    assert call.argument("initrd_fd") == -1
    assert call.argument("flags") == kexec.KEXEC_FILE_NO_INITRAMFS
    assert call.notes == ()
    text = call.describe()
    assert f'kernel_fd=open("{kernel_file}", O_RDONLY)' in text
    assert 'cmdline="console=ttyS0 liveupdate=on"' in text
    assert "flags=0x4 (KEXEC_FILE_NO_INITRAMFS)" in text


def test_plan_load_with_initrd_and_no_command_line(kernel_file: str, tmp_path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"cpio")
    call = kexec.plan_load(kernel_file, initrd=initrd)
    assert call.argument("flags") == 0
    assert call.argument("cmdline_len") == 0 and call.argument("cmdline") is None
    assert f'initrd_fd=open("{initrd}", O_RDONLY)' in call.describe()
    assert any("liveupdate=on" in note for note in call.notes)


def test_reuse_cmdline_drops_boot_image(tmp_path, kernel_file: str) -> None:
    (tmp_path / "cmdline").write_text("BOOT_IMAGE=/vmlinuz-7.3 root=/dev/vda ro liveupdate=on\n")
    assert kexec.running_cmdline(tmp_path) == "root=/dev/vda ro liveupdate=on"
    call = kexec.plan_load(kernel_file, reuse_cmdline=True, proc=tmp_path)
    assert call.argument("cmdline") == "root=/dev/vda ro liveupdate=on"


def test_cmdline_choices_exclude_each_other(kernel_file: str) -> None:
    with pytest.raises(OSError) as info:
        kexec.plan_load(kernel_file, cmdline="x", reuse_cmdline=True)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        kexec.plan_load(kernel_file, cmdline="a\0b")
    assert info.value.errno == errno.EINVAL
    assert "NUL" in str(info.value)


def test_missing_proc_cmdline(tmp_path, kernel_file: str) -> None:
    with pytest.raises(OSError) as info:
        kexec.plan_load(kernel_file, reuse_cmdline=True, proc=tmp_path / "none")
    assert info.value.errno == errno.ENOENT


def test_plan_execute_and_unload() -> None:
    execute = kexec.plan_execute("x86_64")
    assert (execute.name, execute.number) == ("reboot", 169)
    assert [value for _, value, _ in execute.args] == [0xFEE1DEAD, 0x28121969, 0x45584543, None]
    unload = kexec.plan_unload("aarch64")
    assert unload.argument("flags") == kexec.KEXEC_FILE_UNLOAD
    assert unload.argument("kernel_fd") == -1


def test_is_loaded_reads_sysfs(tmp_path) -> None:
    assert kexec.is_loaded(tmp_path) is None
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "kexec_loaded").write_text("0\n")
    assert kexec.is_loaded(tmp_path) is False
    (tmp_path / "kernel" / "kexec_loaded").write_text("1\n")
    assert kexec.is_loaded(tmp_path) is True


# -- the command, dry runs -------------------------------------------------


@needs_known_arch
def test_cli_load_dry_run_prints_the_call(kernel_file: str) -> None:
    code, out, err = run_cli(["kexec", "load", kernel_file, "--append", "console=ttyS0 liveupdate=on", "--dry-run"])
    assert code == 0, err
    load_number = numbers()[0]
    assert out == (
        f'would call: kexec_file_load(kernel_fd=open("{kernel_file}", O_RDONLY), initrd_fd=-1, '
        f'cmdline_len=28, cmdline="console=ttyS0 liveupdate=on", flags=0x4 (KEXEC_FILE_NO_INITRAMFS))'
        f"  [syscall {load_number} on {platform.machine()}]\n"
    )
    assert err == ""


@needs_known_arch
def test_cli_load_dry_run_reuses_this_command_line(kernel_file: str) -> None:
    code, out, err = run_cli(["kexec", "load", kernel_file, "--reuse-cmdline", "--dry-run"])
    assert code == 0, err
    assert f'cmdline="{kexec.running_cmdline()}"' in out
    if "liveupdate=on" not in kexec.running_cmdline().split():
        assert "warning: the command line has no liveupdate=on" in err


@needs_known_arch
def test_cli_exec_and_unload_dry_run() -> None:
    code, out, _ = run_cli(["kexec", "exec", "--dry-run"])
    assert code == 0
    assert out.startswith("would call: sync(); reboot(magic1=0xfee1dead (LINUX_REBOOT_MAGIC1), ")
    assert f"[syscall {numbers()[1]} on" in out
    code, out, _ = run_cli(["kexec", "unload", "--dry-run"])
    assert code == 0
    assert "flags=0x1 (KEXEC_FILE_UNLOAD)" in out


def test_cli_missing_kernel_is_one_line_with_a_hint(tmp_path) -> None:
    code, out, err = run_cli(["kexec", "load", str(tmp_path / "nope"), "--dry-run"])
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("liveupdate kexec load: ") and "does not exist" in err and "(hint: " in err


def test_cli_rejects_both_command_lines(kernel_file: str) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(["kexec", "load", kernel_file, "--append", "x", "--reuse-cmdline"])
    assert info.value.code == 2


def test_python_dash_m_runs_the_same_command(kernel_file: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "liveupdate", "kexec", "load", kernel_file, "--append", "liveupdate=on", "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("would call: kexec_file_load(")


# -- refusals without privileges -------------------------------------------


def as_nobody(work: Callable[[], Any]) -> Dict[str, Any]:
    """Run ``work()`` in a child that became nobody, with no capabilities
    left (checked before ``work`` runs; it never runs otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges in a child needs root")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with open("/proc/self/status") as status:
                caps = next(line for line in status if line.startswith("CapEff:"))
            if int(caps.split()[1], 16) != 0 or os.geteuid() == 0:
                result = {"refused": "privileges still held"}
            else:
                result = {"ok": work()}
        except BaseException as exc:
            result = {"error": repr(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    report = child_report.collect(read_end, pid)
    assert "refused" not in report, "could not drop privileges: nothing was called"
    assert "error" not in report, report
    return report["ok"]


def raised(call: Callable[[], Any]) -> Callable[[], Any]:
    def work():
        try:
            call()
        except OSError as exc:
            return {"errno": exc.errno, "message": str(exc), "type": type(exc).__name__}
        return {"errno": None}

    return work


@needs_known_arch
def test_execute_without_cap_sys_boot_is_eperm() -> None:
    got = as_nobody(raised(kexec.execute))
    assert got["errno"] == errno.EPERM
    assert got["type"] == "PermissionLiveUpdateError"
    assert "kexec_execute()" in got["message"] and "CAP_SYS_BOOT" in got["message"]


@needs_known_arch
def test_cli_exec_without_privileges_is_one_clear_line() -> None:
    code, out, err = as_nobody(lambda: run_cli(["kexec", "exec"]))
    assert code == 1 and out == ""
    progress, last = err.splitlines()  # what it was doing, then the error in one line
    assert progress.startswith("syncing file systems")
    assert last.startswith("liveupdate kexec exec: kexec_execute(): Operation not permitted (EPERM)")
    assert last.endswith("(hint: run it as root, e.g. with sudo)")


@needs_known_arch
def test_load_without_cap_sys_boot_is_eperm() -> None:
    # A kernel file nobody can read: in a world-readable directory.
    directory = tempfile.mkdtemp(prefix="liveupdate-kexec-")
    try:
        os.chmod(directory, 0o755)
        kernel = os.path.join(directory, "bzImage")
        with open(kernel, "wb") as f:
            f.write(b"MZ not really a kernel")
        os.chmod(kernel, 0o644)
        got = as_nobody(raised(lambda: kexec.load(kernel, cmdline="liveupdate=on")))
        if got["errno"] == errno.ENOSYS:
            pytest.skip("this kernel has no kexec_file_load at all, so it answers ENOSYS before any privilege check")
        assert got["errno"] == errno.EPERM, got
        assert f"kexec_file_load(kernel='{kernel}'" in got["message"] and "CAP_SYS_BOOT" in got["message"]
        code, _, err = as_nobody(lambda: run_cli(["kexec", "load", kernel, "--append", "liveupdate=on"]))
        assert code == 1
        assert err.splitlines()[-1].startswith("liveupdate kexec load: kexec_file_load(")
        assert err.rstrip().endswith("(hint: run it as root, e.g. with sudo)")
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)
