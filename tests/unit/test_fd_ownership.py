"""Who owns which fd: nothing leaks, nothing is closed twice."""
from __future__ import annotations

import errno
import gc
import os
import warnings

import pytest

import liveupdate
from liveupdate import _port
from liveupdate.session import Session


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def settled_fds():
    """The fds open now, once garbage left by earlier tests (emulators in
    reference cycles, with their pipes) is collected: else a collection
    that a loop below happens to trigger closes them, and the count
    differs for a reason that is not the loop's."""
    gc.collect()
    return open_fds()


@pytest.fixture
def not_a_device(tmp_path):
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    return str(path)


def test_no_leak_over_10000_low_level_cycles(not_a_device):
    # open + a failing create ioctl + close: every fd the low-level path
    # opens is closed again, on the error path too.
    before = settled_fds()
    for _ in range(10_000):
        dev = liveupdate.open(not_a_device, backend="device")
        try:
            dev.create_session("s")
        except OSError as exc:
            assert exc.errno == errno.ENOTTY
        dev.close()
    assert open_fds() == before


def test_no_leak_over_10000_failed_opens(tmp_path):
    before = settled_fds()
    for _ in range(10_000):
        with pytest.raises(FileNotFoundError):
            liveupdate.open(str(tmp_path / "absent"), backend="device")
    assert open_fds() == before


def test_from_fd_of_a_non_session_leaves_the_fd_to_the_caller():
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            Session.from_fd(r)
        assert info.value.errno == errno.ENOTTY
        assert "Session.from_fd(fd=" in str(info.value)
        os.fstat(r)  # still open
    finally:
        os.close(r)
        os.close(w)


def test_from_fd_of_a_closed_fd_is_ebadf():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        Session.from_fd(r)
    assert info.value.errno == errno.EBADF


def _handle_on(fd):
    # A Session handle around an ordinary fd: enough to check ownership
    # rules (close, detach, GC) without any kernel behind it.
    return Session._adopt(_port.DEVICE, fd, "outgoing", b"test")


def test_close_is_idempotent_and_closes_once():
    r, w = os.pipe()
    os.close(w)
    session = _handle_on(r)
    session.close()
    session.close()
    assert session.closed and session.state == "closed"
    with pytest.raises(OSError):
        os.fstat(r)
    with pytest.raises(ValueError):
        session.fileno()


def test_detach_hands_over_the_fd():
    r, w = os.pipe()
    os.close(w)
    session = _handle_on(r)
    assert session.detach() == r
    assert session.closed
    session.close()
    os.fstat(r)  # not closed by the session
    os.close(r)


def test_garbage_collected_open_session_warns_and_closes():
    r, w = os.pipe()
    os.close(w)
    session = _handle_on(r)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del session
        gc.collect()
    assert any(issubclass(c.category, ResourceWarning) and "unclosed" in str(c.message) for c in caught)
    with pytest.raises(OSError):
        os.fstat(r)


def test_context_manager_closes():
    r, w = os.pipe()
    os.close(w)
    with _handle_on(r) as session:
        assert session.fileno() == r
        assert "fd=%d" % r in repr(session) and "'test'" in repr(session)
    assert session.closed


def test_operations_on_a_closed_session_are_ebadf():
    r, w = os.pipe()
    os.close(w)
    session = _handle_on(r)
    session.close()
    for call in (lambda: session.preserve(0, 1), lambda: session.retrieve(1), session.finish):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_preserve_of_an_impossible_fd_number_is_ebadf():
    r, w = os.pipe()
    os.close(w)
    with _handle_on(r) as session:
        with pytest.raises(OSError) as info:
            session.preserve(2**40, 1)
        assert info.value.errno == errno.EBADF
