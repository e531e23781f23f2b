"""The binding's real system-call path, on what every Linux machine has.

There is no /dev/liveupdate here, so these drive the same code against files
that exist everywhere: the kernel's own answers (ENOENT, ENOTTY, EBADF) must
come back intact, with messages naming the operation and its arguments."""
from __future__ import annotations

import errno
import os

import pytest

import liveupdate
from liveupdate import _abi, _port, errors


@pytest.fixture
def not_a_device(tmp_path):
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    return str(path)


def test_missing_device_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        liveupdate.open(str(tmp_path / "nothing"), backend="device")
    assert info.value.errno == errno.ENOENT
    assert "open(path=" in str(info.value)


def test_missing_default_device_has_a_hint():
    if os.path.exists(liveupdate.DEFAULT_PATH):
        pytest.skip("this kernel has /dev/liveupdate")
    with pytest.raises(FileNotFoundError) as info:
        liveupdate.open(backend="device")
    assert "liveupdate=on" in str(info.value) and "emulator" in str(info.value)


def test_kernel_errno_of_ioctl_comes_back(not_a_device):
    with liveupdate.open(not_a_device, backend="device") as dev:
        assert dev.backend == "device"
        with pytest.raises(OSError) as info:
            dev.create_session("cache")
        assert info.value.errno == errno.ENOTTY
        assert "create_session(name='cache')" in str(info.value)
        with pytest.raises(OSError) as info:
            dev.retrieve_session(b"cache")
        assert info.value.errno == errno.ENOTTY


def test_invalid_name_never_reaches_the_kernel(not_a_device):
    # A plain file would answer ENOTTY; EINVAL proves the check came first.
    with liveupdate.open(not_a_device, backend="device") as dev:
        with pytest.raises(errors.InvalidArgumentError):
            dev.create_session("x" * 64)


def test_closed_device(not_a_device):
    dev = liveupdate.open(not_a_device, backend="device")
    dev.close()
    dev.close()  # idempotent
    assert dev.closed
    with pytest.raises(ValueError):
        dev.fileno()
    with pytest.raises(OSError) as info:
        dev.create_session("x")
    assert info.value.errno == errno.EBADF
    assert "closed" in repr(dev)


def test_device_cannot_be_built_directly():
    with pytest.raises(TypeError):
        liveupdate.Device()
    with pytest.raises(TypeError, match="create_session"):
        liveupdate.Session()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        liveupdate.open(backend="floppy")


class _BusyThenFree:
    """Answers EBUSY a number of times, as the kernel does while another
    process holds the device, then opens a real fd."""

    kind = "device"

    def __init__(self, busy: int, path: str) -> None:
        self.busy = busy
        self.path = path
        self.attempts = 0
        self.ioctl = _port.DEVICE.ioctl
        self.close = _port.DEVICE.close

    def open_device(self, path):
        self.attempts += 1
        if self.attempts <= self.busy:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)


def test_busy_without_timeout_fails_at_once(not_a_device):
    port = _BusyThenFree(1, not_a_device)
    with pytest.raises(errors.BusyError) as info:
        liveupdate.Device._open_port(port, "/dev/liveupdate", 0)
    assert port.attempts == 1
    assert "timeout" in str(info.value)


def test_busy_with_timeout_retries_until_free(not_a_device):
    port = _BusyThenFree(3, not_a_device)
    with liveupdate.Device._open_port(port, "/dev/liveupdate", 5) as dev:
        assert port.attempts == 4 and dev.fileno() >= 0


def test_busy_past_timeout_is_a_clear_error(not_a_device):
    port = _BusyThenFree(10**9, not_a_device)
    with pytest.raises(errors.BusyError) as info:
        liveupdate.Device._open_port(port, "/dev/liveupdate", 0.05)
    assert info.value.errno == errno.EBUSY
    assert "after 0.05 s" in str(info.value) and "timeout=0.05" in str(info.value)


class _InterruptedOnce:
    kind = "device"

    def __init__(self) -> None:
        self.calls = 0

    def ioctl(self, fd, cmd, arg):
        self.calls += 1
        if self.calls == 1:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return _abi.CREATE_SESSION.pack(72, 99, b"")


def test_eintr_is_retried(not_a_device):
    port = _InterruptedOnce()
    fd = os.open(not_a_device, os.O_RDONLY)
    try:
        dev = liveupdate.Device.__new__(liveupdate.Device)
        dev._port, dev._ioctl, dev._fd, dev._path = port, port.ioctl, fd, not_a_device
        session = dev.create_session("x")
        assert port.calls == 2 and session._fd == 99
        session.detach()
        dev._fd = -1
    finally:
        os.close(fd)


class _NoService:
    kind = "service"

    def open_device(self, path):
        raise OSError(errno.ENOENT, "no emulator service is listening at /x.sock")


def test_missing_service_is_not_blamed_on_the_kernel():
    with pytest.raises(FileNotFoundError) as info:
        liveupdate.Device._open_port(_NoService(), liveupdate.DEFAULT_PATH, 0)
    assert "no emulator service is listening" in str(info.value)
    assert "liveupdate=on" not in str(info.value)
