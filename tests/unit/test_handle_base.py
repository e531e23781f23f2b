"""Device and Session share one handle base (liveupdate/_handle.py): the
same fileno/close/retry/wrap code, so the two cannot drift apart again."""
from __future__ import annotations

import errno
import os
from typing import List

import pytest

import liveupdate
from liveupdate._handle import Handle
from liveupdate.session import Session


class ClosingPort:
    """A port whose first ioctl is interrupted (EINTR); during the retry
    another thread closes the handle, so fcntl.ioctl meets fd -1 and
    refuses it with ValueError (the race, made deterministic)."""

    kind = "device"

    def __init__(self) -> None:
        self.handle: object = None
        self.closed: List[int] = []
        self.calls = 0

    def open_device(self, path: str) -> int:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def ioctl(self, fd: int, cmd: int, arg: bytes) -> bytes:
        self.calls += 1
        if self.calls == 1:
            raise InterruptedError(errno.EINTR, "interrupted")
        self.handle.close()  # type: ignore[attr-defined]  # "another thread"
        raise ValueError("file descriptor cannot be a negative integer (-1)")

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        os.close(fd)


def test_a_session_closed_during_a_retried_call_is_ebadf_not_a_raw_valueerror():
    # Session's retry used to catch only OSError, Device's also ValueError:
    # a session closed while its call was being retried leaked fcntl's
    # ValueError instead of the library's EBADF.
    port = ClosingPort()
    session = Session._adopt(port, os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), "outgoing", b"s")
    port.handle = session
    with pytest.raises(liveupdate.LiveUpdateError) as info:
        session.finish()
    assert info.value.errno == errno.EBADF
    assert "the session is closed" in str(info.value) and "session='s'" in str(info.value)
    assert port.calls == 2


def test_a_device_closed_during_a_retried_call_is_ebadf():
    port = ClosingPort()
    dev = liveupdate.Device._open_port(port, "/dev/null")
    port.handle = dev
    with pytest.raises(liveupdate.LiveUpdateError) as info:
        dev.create_session("x")
    assert info.value.errno == errno.EBADF and "the device is closed" in str(info.value)


def test_a_valueerror_on_an_open_handle_goes_up_unchanged():
    class Refusing(ClosingPort):
        def ioctl(self, fd: int, cmd: int, arg: bytes) -> bytes:
            raise ValueError("ioctl string arg too long")

    port = Refusing()
    dev = liveupdate.Device._open_port(port, "/dev/null")
    with dev, pytest.raises(ValueError, match="too long") as info:
        dev.create_session("x")
    assert not isinstance(info.value, OSError)


def test_close_is_idempotent_and_the_context_manager_closes():
    port = ClosingPort()
    with liveupdate.Device._open_port(port, "/dev/null") as dev:
        assert isinstance(dev, Handle) and dev.fileno() >= 0
        fd = dev.fileno()
    assert dev.closed and port.closed == [fd]
    dev.close()
    dev.close()
    assert port.closed == [fd]
    with pytest.raises(ValueError, match="closed device"):
        dev.fileno()
    session = Session._adopt(port, os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), "outgoing", b"s")
    with session as entered:
        assert entered is session and isinstance(session, Handle)
    session.close()
    assert session.closed and len(port.closed) == 2
    with pytest.raises(ValueError, match="closed session"):
        session.fileno()
