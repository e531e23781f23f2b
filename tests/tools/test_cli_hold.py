"""`liveupdate hold` / `release` end to end through the emulator service."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import liveupdate

from liveupdate.service import testing as service_testing


@pytest.fixture
def service(tmp_path):
    (tmp_path / "svc").mkdir()
    with service_testing.running_service(tmp_path / "svc") as socket_path:
        yield socket_path


def cli(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "liveupdate", *argv], capture_output=True, text=True, timeout=60,
                          **kwargs)


def make_memfd(data: bytes) -> int:
    fd = os.memfd_create("held")
    os.write(fd, data)
    return fd


def session_exists(socket_path: str, name: str) -> bool:
    with liveupdate.open(emulator=socket_path, timeout=10) as dev:
        try:
            dev.create_session(name).close()
        except FileExistsError:
            return True
    return False


def test_hold_survives_kexec_and_release_drops(service, tmp_path):
    state = str(tmp_path / "state")
    a, b = make_memfd(b"alpha"), make_memfd(b"beta" * 3000)
    try:
        proc = cli("hold", "cache", f"0x10=/proc/{os.getpid()}/fd/{a}", f"fd:{b}", "--emulator", service,
                   "--state-dir", state, pass_fds=(b,))
    finally:
        os.close(a)
        os.close(b)
    assert proc.returncode == 0, proc.stderr
    assert "holding session 'cache'" in proc.stdout and "16 (0x10=" in proc.stdout and "0 (fd:" in proc.stdout
    assert session_exists(service, "cache")  # held by the background process

    kexec = cli("emulator", "kexec", "--socket", service)
    assert kexec.returncode == 0, kexec.stderr
    with liveupdate.open(emulator=service, timeout=10) as dev, dev.retrieve_session("cache") as session:
        fd16, fd0 = session.retrieve(0x10), session.retrieve(0)
        assert os.pread(fd16, 100, 0) == b"alpha"
        assert os.pread(fd0, 20000, 0) == b"beta" * 3000
        os.close(fd16)
        os.close(fd0)
        session.finish()
    # The holder's handle went stale with the kexec; release still stops it.
    assert cli("release", "cache", "--state-dir", state).returncode == 0


def test_release_unpreserves(service, tmp_path):
    state = str(tmp_path / "state")
    fd = make_memfd(b"x")
    try:
        assert cli("hold", "s1", f"fd:{fd}", "--emulator", service, "--state-dir", state,
                   pass_fds=(fd,)).returncode == 0
    finally:
        os.close(fd)
    assert session_exists(service, "s1")
    again = cli("hold", "s1", "/dev/null", "--emulator", service, "--state-dir", state)
    assert again.returncode == 1 and "already held" in again.stderr
    released = cli("release", "s1", "--state-dir", state)
    assert released.returncode == 0 and "released session 's1'" in released.stdout
    assert not session_exists(service, "s1")
    missing = cli("release", "s1", "--state-dir", state)
    assert missing.returncode == 1 and "not held" in missing.stderr


def test_copy_and_errors(service, tmp_path):
    state = str(tmp_path / "state")
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"copied into a memfd")
    refused = cli("hold", "c", str(plain), "--emulator", service, "--state-dir", state)
    assert refused.returncode == 1 and "not a memfd" in refused.stderr and "--copy" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert cli("hold", "c", str(plain), "--copy", "--emulator", service, "--state-dir", state).returncode == 0
    assert cli("emulator", "kexec", "--socket", service).returncode == 0
    with liveupdate.open(emulator=service, timeout=10) as dev, dev.retrieve_session("c") as session:
        fd = session.retrieve(0)
        assert os.pread(fd, 100, 0) == b"copied into a memfd"
        os.close(fd)
        session.finish()
    cli("release", "c", "--state-dir", state)


def test_kernel_errors_come_back_as_one_line(service, tmp_path):
    state = str(tmp_path / "state")
    with liveupdate.open(emulator=service, timeout=10) as dev:
        taken = dev.create_session("taken")
    fd = make_memfd(b"y")
    try:
        proc = cli("hold", "taken", f"fd:{fd}", "--emulator", service, "--state-dir", state, pass_fds=(fd,))
    finally:
        os.close(fd)
        taken.close()
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "create_session(name='taken')" in proc.stderr and os.strerror(errno.EEXIST) in proc.stderr


def test_no_device_no_service_is_refused(tmp_path):
    if os.path.exists(liveupdate.DEFAULT_PATH):
        pytest.skip("this kernel has a device")
    env = {k: v for k, v in os.environ.items() if k != "LIVEUPDATE_EMULATOR"}
    fd = make_memfd(b"z")
    try:
        proc = cli("hold", "n", f"fd:{fd}", "--state-dir", str(tmp_path), pass_fds=(fd,), env=env)
    finally:
        os.close(fd)
    assert proc.returncode == 1 and "in-process emulator would die" in proc.stderr


# -- the real thing, in the VM tier --------------------------------------------


def test_real_hold_across_kexec(tmp_path):
    """Stage 1 holds a memfd on the real device and leaves the holder
    running through the kexec; stage 2 retrieves it from the new kernel."""
    stage = os.environ.get("LIVEUPDATE_STAGE")
    out = os.environ.get("LIVEUPDATE_VM_OUT")
    if not stage or not out or not os.path.exists(liveupdate.DEFAULT_PATH):
        pytest.skip("runs in the VM tier across a real kexec (tests/vm/test_guest_tools.py)")
    if stage == "1":
        if os.environ.get("LIVEUPDATE_VM_KEXEC") != "1":
            pytest.skip("stage 1 of a round trip only (run with --kexec)")
        fd = make_memfd(b"held by liveupdate hold")
        try:
            proc = cli("hold", "real-held", f"0x2A=fd:{fd}", "--state-dir", str(tmp_path), pass_fds=(fd,))
        finally:
            os.close(fd)
        assert proc.returncode == 0, proc.stderr
        assert "holding session 'real-held'" in proc.stdout
        return  # the holder keeps the session through the kexec that follows
    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    with liveupdate.open(backend="device", timeout=10) as dev, dev.retrieve_session("real-held") as session:
        fd = session.retrieve(0x2A)
        try:
            assert os.pread(fd, 100, 0) == b"held by liveupdate hold"
        finally:
            os.close(fd)
        session.finish()
