"""The 15 cases of the kernel's tools/testing/selftests/liveupdate/liveupdate.c,
one test each, same names, same expectations (errnos included), written
against the public API and run on every backend.

Where the C test sends a struct the API would refuse before the ioctl (a
name without its NUL), the struct goes through the backend's port as is, so
the backend's own answer is what is checked.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Callable

from liveupdate import _abi

from .helpers import close_quietly, contents, create_arg, raises_errno, raw_ioctl


def test_basic_open_close(backend: Any) -> None:
    device = backend.open()
    assert device.fileno() >= 0
    device.close()
    assert device.closed


def test_exclusive_open(backend: Any, dev: Any) -> None:
    with raises_errno(errno.EBUSY):
        second = backend.open()
        second.close()  # only reached if the backend wrongly let it open


def test_create_duplicate_session(dev: Any, track: Callable) -> None:
    track(dev.create_session("duplicate-session-test"))
    with raises_errno(errno.EEXIST):
        track(dev.create_session("duplicate-session-test"))


def test_create_distinct_sessions(dev: Any, track: Callable) -> None:
    one = track(dev.create_session("distinct-session-1"))
    two = track(dev.create_session("distinct-session-2"))
    assert one.fileno() != two.fileno()
    one.close()
    two.close()


def test_preserve_memfd(dev: Any, track: Callable, memfd: Callable) -> None:
    text = b"hello liveupdate"
    session = track(dev.create_session("preserve-memfd-test"))
    fd = memfd(text)
    session.preserve(fd, 0x1234)
    session.close()
    os.lseek(fd, 0, os.SEEK_SET)
    assert os.read(fd, 64) == text


def test_preserve_multiple_memfds(dev: Any, track: Callable, memfd: Callable) -> None:
    one, two = b"data for memfd one", b"data for memfd two"
    session = track(dev.create_session("preserve-multi-memfd-test"))
    fd1, fd2 = memfd(one, "test-memfd-1"), memfd(two, "test-memfd-2")
    session.preserve(fd1, 0xAAAA)
    session.preserve(fd2, 0xBBBB)
    for fd, text in ((fd1, one), (fd2, two)):
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 64) == text


def test_preserve_complex_scenario(dev: Any, track: Callable, memfd: Callable) -> None:
    data1, data2 = b"data for session 1", b"data for session 2"
    s1 = track(dev.create_session("complex-session-1"))
    s2 = track(dev.create_session("complex-session-2"))
    full1, empty1 = memfd(data1, "data1"), memfd(b"", "empty1")
    full2, empty2 = memfd(data2, "data2"), memfd(b"", "empty2")
    s1.preserve(full1, 0x1111)
    s1.preserve(empty1, 0x2222)
    s2.preserve(full2, 0x3333)
    s2.preserve(empty2, 0x4444)
    assert contents(full1) == data1
    assert contents(full2) == data2
    assert contents(empty1) == b""
    assert contents(empty2) == b""


def test_preserve_unsupported_fd(dev: Any, track: Callable, cleanup: Any) -> None:
    session = track(dev.create_session("unsupported-fd-test"))
    null = os.open("/dev/null", os.O_RDWR)
    cleanup.callback(close_quietly, null)
    with raises_errno(errno.ENOENT):
        session.preserve(null, 0xDEAD)


def test_prevent_double_preservation(dev: Any, track: Callable, memfd: Callable) -> None:
    s1 = track(dev.create_session("double-preserve-session-1"))
    s2 = track(dev.create_session("double-preserve-session-2"))
    fd = memfd()
    s1.preserve(fd, 0x1111)
    with raises_errno(errno.EBUSY):
        s2.preserve(fd, 0x2222)
    with raises_errno(errno.EBUSY):
        s1.preserve(fd, 0x3333)


def test_create_session_no_null_termination(dev: Any) -> None:
    arg = create_arg(b"X" * _abi.NAME_LENGTH)
    with raises_errno(errno.EINVAL):
        out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, arg)
        close_quietly(_abi.CREATE_SESSION.unpack(out)[1])  # wrongly accepted
    # The API refuses the same name before the ioctl, with the same errno.
    with raises_errno(errno.EINVAL):
        dev.create_session("X" * _abi.NAME_LENGTH).close()


def test_create_session_empty_name(dev: Any) -> None:
    with raises_errno(errno.EINVAL):
        out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b""))
        close_quietly(_abi.CREATE_SESSION.unpack(out)[1])
    with raises_errno(errno.EINVAL):
        dev.create_session("").close()


def test_get_session_name(dev: Any, track: Callable) -> None:
    session = track(dev.create_session("get-name-test-session"))
    assert session.name == "get-name-test-session"


def test_get_session_name_max_length(dev: Any, track: Callable) -> None:
    long_name = "A" * (_abi.NAME_LENGTH - 1)
    session = track(dev.create_session(long_name))
    assert session.name == long_name


MANY_SESSIONS = 2000
MANY_FILES = 500


def test_preserve_many_sessions(dev: Any, track: Callable, nofile: Callable) -> None:
    nofile(MANY_SESSIONS)
    sessions = [track(dev.create_session(f"many-session-{i}")) for i in range(MANY_SESSIONS)]
    assert len({s.fileno() for s in sessions}) == MANY_SESSIONS
    for session in sessions:
        session.close()


def test_preserve_many_files(dev: Any, track: Callable, nofile: Callable) -> None:
    session = track(dev.create_session("many-files-test"))
    nofile(MANY_FILES + 10)
    fds = []
    try:
        for i in range(MANY_FILES):
            fds.append(os.memfd_create("test-memfd", 0))
            session.preserve(fds[-1], i)
    finally:
        for fd in fds:
            os.close(fd)
    session.close()
