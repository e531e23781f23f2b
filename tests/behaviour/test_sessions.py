"""Sessions before any kexec: names, duplicates, lifetime, what an outgoing
session refuses (kernel/liveupdate/luo_session.c)."""
from __future__ import annotations

import errno
from typing import Any, Callable

import pytest

from liveupdate import _abi

from .helpers import close_quietly, create_arg, is_cloexec, raises_errno, raw_ioctl

NAMES = [
    "a",
    "x" * 63,
    "séance-ключ-鍵",
    "é" * 31 + "x",  # 63 bytes of UTF-8 in 32 characters
    "name with spaces/and\tcontrol\x01chars",
]


@pytest.mark.parametrize("name", NAMES, ids=["one-byte", "63-ascii", "non-ascii", "63-bytes-utf8", "odd-bytes"])
def test_name_round_trip(dev: Any, track: Callable, name: str) -> None:
    session = track(dev.create_session(name))
    assert session.name == name
    assert session.name_bytes == name.encode()


def test_bytes_name_round_trip(dev: Any, track: Callable) -> None:
    session = track(dev.create_session(b"bytes-name"))
    assert session.name == "bytes-name"


@pytest.mark.parametrize("name", ["y" * 64, "é" * 32, "", "nul\0inside"])
def test_bad_names_are_einval(dev: Any, name: str) -> None:
    with raises_errno(errno.EINVAL):
        dev.create_session(name).close()


def test_64_byte_name_raw_is_einval_63_is_not(dev: Any) -> None:
    # strnlen(name, 64) must be 1..63: the kernel's own check, not the API's.
    with raises_errno(errno.EINVAL):
        raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b"z" * 64))
    out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b"z" * 63))
    fd = _abi.CREATE_SESSION.unpack(out)[1]
    try:
        assert fd >= 0
    finally:
        dev._port.close(fd)


def test_name_stops_at_first_nul_raw(dev: Any, track: Callable) -> None:
    # The kernel copies the name up to its NUL: what follows is ignored, so
    # "dup\0one" and "dup\0two" are the same name.
    out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b"dup\0one"))
    fd = _abi.CREATE_SESSION.unpack(out)[1]
    try:
        with raises_errno(errno.EEXIST):
            raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b"dup\0two"))
        with raises_errno(errno.EEXIST):
            track(dev.create_session("dup"))
    finally:
        dev._port.close(fd)


def test_names_differing_in_last_byte_are_distinct(dev: Any, track: Callable) -> None:
    a = track(dev.create_session("n" * 62 + "a"))
    b = track(dev.create_session("n" * 62 + "b"))
    assert a.name != b.name


def test_names_are_case_sensitive(dev: Any, track: Callable) -> None:
    track(dev.create_session("Case"))
    track(dev.create_session("case"))


def test_session_fds_are_cloexec(dev: Any, track: Callable) -> None:
    session = track(dev.create_session("cloexec-session"))
    assert is_cloexec(session.fileno())


def test_retrieve_of_missing_session_is_enoent(dev: Any) -> None:
    with raises_errno(errno.ENOENT):
        dev.retrieve_session("never-existed").close()


def test_retrieve_of_outgoing_session_is_enoent(dev: Any, track: Callable) -> None:
    # Retrieval looks only at what the previous kernel handed over.
    track(dev.create_session("outgoing-only"))
    with raises_errno(errno.ENOENT):
        dev.retrieve_session("outgoing-only").close()


def test_retrieve_fd_on_outgoing_is_einval(dev: Any, track: Callable) -> None:
    session = track(dev.create_session("outgoing-retrieve-fd"))
    with raises_errno(errno.EINVAL):
        session.retrieve(0)


def test_finish_on_outgoing_is_einval(dev: Any, track: Callable) -> None:
    session = track(dev.create_session("outgoing-finish"))
    with raises_errno(errno.EINVAL):
        session.finish()
    # Still a working outgoing session afterwards.
    assert session.name == "outgoing-finish"


def test_sessions_outlive_the_device_fd(backend: Any, track: Callable, memfd: Callable) -> None:
    # Sessions belong to the kernel and to their own fds, not to the device fd.
    device = backend.open()
    session = track(device.create_session("outlives-device"))
    device.close()
    session.preserve(memfd(), 1)
    assert session.name == "outlives-device"
    with backend.open() as again:
        with raises_errno(errno.EEXIST):
            track(again.create_session("outlives-device"))


def test_closed_session_handle_is_ebadf(dev: Any) -> None:
    session = dev.create_session("closed-handle")
    session.close()
    session.close()  # idempotent
    with raises_errno(errno.EBADF):
        session.preserve(0, 1)


def test_closed_device_handle_is_ebadf(backend: Any) -> None:
    device = backend.open()
    device.close()
    device.close()  # idempotent
    with raises_errno(errno.EBADF):
        device.create_session("after-close")


def test_detach_and_adopt(dev: Any, track: Callable) -> None:
    from liveupdate import Session

    session = dev.create_session("detach-adopt")
    fd = session.detach()
    try:
        adopted = track(Session.from_fd(fd))
    except BaseException:
        close_quietly(fd)
        raise
    assert adopted.name == "detach-adopt"
    adopted.close()
    # Closing the adopted handle released the session: its name is free.
    track(dev.create_session("detach-adopt"))


def test_every_session_is_a_plain_session(dev: Any, track: Callable) -> None:
    # The package builds sessions through a private subclass (the cheap
    # way, without an __init__ frame); nothing about it may show.
    from liveupdate import Session

    created = track(dev.create_session("plain-created"))
    adopted = track(Session.from_fd(dev.create_session("plain-adopted").detach()))
    # An adopted session asks the kernel which kind it is: outgoing here.
    for session, state in ((created, "outgoing"), (adopted, "outgoing")):
        assert isinstance(session, Session)
        assert type(session).__name__ == "Session"
        assert not hasattr(session, "__dict__")
        assert session.state == state
        assert repr(session).startswith("<liveupdate.Session ")


def test_many_sessions_keep_their_names(dev: Any, track: Callable, nofile: Callable) -> None:
    # 2000 sessions (40 blocks of 51), half closed in between so the chain
    # shrinks from its middle entries' point of view; the rest still answer.
    count = 2000
    nofile(count)
    sessions = [track(dev.create_session(f"many-names-{i}")) for i in range(count)]
    for i in range(0, count, 2):
        sessions[i].close()
    for i in range(1, count, 2):
        assert sessions[i].name == f"many-names-{i}"
    for i in range(0, count, 2):
        sessions[i] = track(dev.create_session(f"many-names-{i}"))
    with raises_errno(errno.EEXIST):
        track(dev.create_session("many-names-0"))
