"""``kexec load`` on what is not a kernel image: a dry run refuses what the
real load would (a FIFO, /dev/zero, a directory, a huge sparse file, a
symlink loop, a command line over COMMAND_LINE_SIZE), a real load never
blocks opening a FIFO, and --append's control characters are escaped."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from liveupdate import kexec

from .test_cli_kexec import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def kernel(tmp_path) -> str:
    path = tmp_path / "bzImage"
    path.write_bytes(b"MZ not really a kernel")
    return str(path)


def _hostile(tmp_path: Path, kind: str) -> str:
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        os.symlink("/dev/zero", path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "sparse":
        with open(path, "wb") as out:
            out.truncate(4 << 30)
    elif kind == "loop":
        os.symlink(tmp_path / "loop2", path)
        os.symlink(path, tmp_path / "loop2")
    elif kind == "empty":
        path.write_bytes(b"")
    return str(path)


CASES = [
    ("fifo", errno.EINVAL, "is a FIFO, not a regular file"),
    ("zero", errno.EINVAL, "is a device, not a regular file"),
    ("directory", errno.EISDIR, "is a directory"),
    ("sparse", errno.EFBIG, "is 4294967296 bytes"),
    ("loop", errno.ELOOP, "path is a loop of symbolic links"),
    ("empty", errno.ENOEXEC, "is empty"),
]


@pytest.mark.parametrize("kind, err, says", CASES)
def test_dry_run_refuses_what_is_no_kernel(tmp_path, kind, err, says):
    path = _hostile(tmp_path, kind)
    code, out, stderr = run_cli(["kexec", "load", path, "--append", "liveupdate=on", "--dry-run"])
    assert code == 1 and out == ""
    assert stderr.count("\n") == 1 and f"the kernel {says}" in stderr, stderr
    assert f"({errno.errorcode[err]})" in stderr


@pytest.mark.parametrize("kind, err, says", CASES)
def test_the_initrd_is_checked_too(tmp_path, kernel, kind, err, says):
    if kind == "sparse":
        pytest.skip("4 GiB is above the kernel cap but an initrd may be 2 GiB: see the next test")
    with pytest.raises(OSError) as info:
        kexec.plan_load(kernel, initrd=_hostile(tmp_path, kind), cmdline="liveupdate=on")
    assert info.value.errno == err and f"the initrd {says}" in str(info.value)


def test_an_initrd_over_its_cap(tmp_path, kernel):
    path = tmp_path / "initrd"
    with open(path, "wb") as out:
        out.truncate(kexec.INITRD_MAX + 1)
    with pytest.raises(OSError) as info:
        kexec.plan_load(kernel, initrd=path)
    assert info.value.errno == errno.EFBIG


def test_a_real_load_never_blocks_on_a_fifo(tmp_path):
    fifo = _hostile(tmp_path, "fifo")
    # In a child with a deadline: before the fix, open() of the FIFO
    # blocked for ever (nobody writes to it), also without privileges.
    done = subprocess.run([sys.executable, "-c", "import sys, liveupdate.kexec as k; k.load(sys.argv[1])", fifo],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 1
    assert "is a FIFO, not a regular file" in done.stderr


def test_a_command_line_over_the_kernels_limit(kernel):
    fits = "x" * (kexec.COMMAND_LINE_SIZE - 1)
    assert kexec.plan_load(kernel, cmdline=fits).argument("cmdline_len") == kexec.COMMAND_LINE_SIZE
    with pytest.raises(OSError) as info:
        kexec.plan_load(kernel, cmdline=fits + "y")
    assert info.value.errno == errno.EINVAL and "at most 2047" in str(info.value)
    code, out, err = run_cli(["kexec", "load", kernel, "--append", "y" * 100_000, "--dry-run"])
    assert code == 1 and out == "" and "100000 bytes" in err
    assert len(err) < 1000, "the message shows only the start of the command line"


@pytest.mark.parametrize("cmdline", ["liveupdate=on \ud800", b"liveupdate=on", 7])
def test_a_command_line_no_kernel_can_take_is_einval(kernel, cmdline):
    with pytest.raises(OSError) as info:
        kexec.plan_load(kernel, cmdline=cmdline)
    assert info.value.errno == errno.EINVAL


def test_bytes_that_were_not_utf8_cross_as_they_were(kernel):
    line = b"liveupdate=on name=\xff".decode("utf-8", "surrogateescape")
    call = kexec.plan_load(kernel, cmdline=line)
    assert call.argument("cmdline_len") == len(b"liveupdate=on name=\xff") + 1
    assert '\\xff"' in call.describe()


@pytest.mark.parametrize("argument", ["kernel", "initrd"])
def test_an_empty_path_is_einval_not_the_current_directory(kernel, argument):
    with pytest.raises(OSError) as info:
        if argument == "kernel":
            kexec.plan_load("")
        else:
            kexec.plan_load(kernel, initrd="")
    assert info.value.errno == errno.EINVAL and f"the {argument} path is empty" in str(info.value)


def test_control_characters_of_append_are_escaped(kernel):
    code, out, err = run_cli(["kexec", "load", kernel, "--append", "liveupdate=on \x1b[2J\x07\r", "--dry-run"])
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert 'cmdline="liveupdate=on \\x1b[2J\\x07\\x0d"' in out


def test_errors_name_kexec_file_load_and_a_short_command_line(tmp_path):
    code, _, err = run_cli(["kexec", "load", str(tmp_path / "nope"), "--append", "z" * 600, "--dry-run"])
    assert code == 1
    assert "kexec_load(" not in err
    assert len(err) < 400, err


def test_exec_says_nothing_is_loaded_before_it_says_it_jumps(monkeypatch, capsys):
    from liveupdate.cli import kexec as cli_kexec

    monkeypatch.setattr(kexec, "is_loaded", lambda sys="/sys": False)
    monkeypatch.setattr(cli_kexec, "_may_boot", lambda: True)
    monkeypatch.setattr(kexec, "execute", lambda: pytest.fail("must not be called"))
    code, out, err = run_cli(["kexec", "exec"])
    assert code == 1
    assert "jumping" not in err and "no kernel is loaded for kexec" in err
