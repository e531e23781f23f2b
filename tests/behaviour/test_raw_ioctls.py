"""Argument structs sent as is, past the API: the kernel's own decoding.

luo_ioctl() (luo_core.c) and luo_session_ioctl() (luo_session.c) both:
refuse a command number outside their table (EINVAL); answer a number in
the table whose other bits differ (ENOIOCTLCMD, which user space sees as
ENOTTY); refuse a size field below the end of the struct's last required
member (EINVAL); accept a larger struct only if the extra bytes are zero
(copy_struct_from_user(): E2BIG otherwise). Session ioctls check the
session's direction before the size.
"""
from __future__ import annotations

import errno
import struct
from typing import Any, Callable

import pytest

from liveupdate import _abi

from .helpers import create_arg, raises_errno, raw_ioctl

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int, kind: int = _abi.IOCTL_TYPE) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _close_session_fd(dev: Any, out: bytes) -> None:
    dev._port.close(struct.unpack_from("=i", out, 4)[0])


@pytest.fixture
def session(dev: Any, track: Callable) -> Any:
    return track(dev.create_session("raw-ioctl-session"))


# -- /dev/liveupdate --------------------------------------------------------

@pytest.mark.parametrize("size", [0, 4, 8, 71])
def test_create_with_short_size_is_einval(dev: Any, size: int) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b"short", size=size))


def test_create_with_longer_zero_padded_struct_works(dev: Any) -> None:
    arg = create_arg(b"padded", size=96) + bytes(24)
    out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, arg)
    assert len(out) == len(arg)
    try:
        assert struct.unpack_from("=i", out, 4)[0] >= 0
        # The kernel writes back only its own struct's 72 bytes.
        assert out[72:] == bytes(24)
    finally:
        _close_session_fd(dev, out)


@pytest.mark.parametrize("where", [72, 80, 95])
def test_create_with_nonzero_tail_is_e2big(dev: Any, where: int) -> None:
    tail = bytearray(24)
    tail[where - 72] = 1
    with raises_errno(errno.E2BIG):
        out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b"tail", size=96) + bytes(tail))
        _close_session_fd(dev, out)


def test_create_ignores_the_fd_field(dev: Any) -> None:
    arg = _abi.CREATE_SESSION.pack(_abi.CREATE_SESSION.size, 12345, b"fd-field-ignored")
    out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, arg)
    try:
        assert struct.unpack_from("=i", out, 4)[0] != 12345
    finally:
        _close_session_fd(dev, out)


@pytest.mark.parametrize("size", [0, 71])
def test_retrieve_with_short_size_is_einval(dev: Any, size: int) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(dev, _abi.IOCTL_RETRIEVE_SESSION, create_arg(b"x", size=size))


@pytest.mark.parametrize("name", [b"", b"Q" * 64])
def test_retrieve_checks_no_name_length(dev: Any, name: bytes) -> None:
    # luo_session_retrieve() only looks the name up: nothing matches.
    with raises_errno(errno.ENOENT):
        raw_ioctl(dev, _abi.IOCTL_RETRIEVE_SESSION, create_arg(name))


@pytest.mark.parametrize("nr", [0x02, 0x03, 0x40, 0x43, 0xFF])
def test_device_unknown_command_number_is_einval(dev: Any, nr: int) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(dev, _ioc(0, nr, 0), create_arg(b"unknown-nr"))


@pytest.mark.parametrize("cmd", [
    _ioc(_IOC_READ | _IOC_WRITE, 0x00, 72),
    _ioc(_IOC_WRITE, 0x01, 72),
    _ioc(0, 0x00, 0, kind=0xBB),
])
def test_device_known_number_other_bits_is_enotty(dev: Any, cmd: int) -> None:
    with raises_errno(errno.ENOTTY):
        out = raw_ioctl(dev, cmd, create_arg(b"wrong-encoding"))
        _close_session_fd(dev, out)


# -- session fds -----------------------------------------------------------

@pytest.mark.parametrize("nr", [0x00, 0x01, 0x3F, 0x44, 0xFF])
def test_session_unknown_command_number_is_einval(session: Any, nr: int) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _ioc(0, nr, 0), _abi.GET_NAME.pack(_abi.GET_NAME.size, 0, b""))


def test_session_known_number_other_bits_is_enotty(session: Any) -> None:
    with raises_errno(errno.ENOTTY):
        raw_ioctl(session, _ioc(_IOC_READ, 0x43, 72), _abi.GET_NAME.pack(_abi.GET_NAME.size, 0, b""))


def test_get_name_with_nonzero_reserved_is_einval(session: Any) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_GET_NAME, _abi.GET_NAME.pack(_abi.GET_NAME.size, 1, b""))


@pytest.mark.parametrize("size", [0, 8, 71])
def test_get_name_with_short_size_is_einval(session: Any, size: int) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_GET_NAME, _abi.GET_NAME.pack(size, 0, b""))


def test_get_name_raw_fills_the_name_field(session: Any) -> None:
    out = raw_ioctl(session, _abi.SESSION_GET_NAME, _abi.GET_NAME.pack(_abi.GET_NAME.size, 0, b"\xff" * 64))
    size, reserved, name = _abi.GET_NAME.unpack(out)
    assert (size, reserved) == (72, 0)
    # strscpy() writes the name and its NUL; what follows is not specified
    # (the word-at-a-time copy may clear a few bytes), so only that is checked.
    assert name[:18] == b"raw-ioctl-session\0"


def test_get_name_with_nonzero_tail_is_e2big(session: Any) -> None:
    arg = _abi.GET_NAME.pack(80, 0, b"") + b"\0\0\0\x01" + bytes(4)
    with raises_errno(errno.E2BIG):
        raw_ioctl(session, _abi.SESSION_GET_NAME, arg)


@pytest.mark.parametrize("size", [0, 8, 15])
def test_preserve_with_short_size_is_einval(session: Any, memfd: Callable, size: int) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_PRESERVE_FD, _abi.PRESERVE_FD.pack(size, memfd(), 1))


def test_preserve_with_longer_zero_padded_struct_works(session: Any, memfd: Callable) -> None:
    fd = memfd()
    raw_ioctl(session, _abi.SESSION_PRESERVE_FD, _abi.PRESERVE_FD.pack(24, fd, 77) + bytes(8))
    with raises_errno(errno.EEXIST):
        session.preserve(memfd(), 77)


def test_preserve_with_nonzero_tail_is_e2big(session: Any, memfd: Callable) -> None:
    fd = memfd()
    with raises_errno(errno.E2BIG):
        raw_ioctl(session, _abi.SESSION_PRESERVE_FD, _abi.PRESERVE_FD.pack(24, fd, 78) + b"\x01" + bytes(7))
    # Nothing was preserved.
    session.preserve(fd, 78)


@pytest.mark.parametrize("size", [0, 16, 1024])
def test_retrieve_fd_on_outgoing_is_einval_whatever_the_size(session: Any, size: int) -> None:
    # The direction check comes before the size check.
    arg = _abi.RETRIEVE_FD.pack(size, -1, 0)
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_RETRIEVE_FD, arg + bytes(max(0, size - len(arg))))


def test_finish_on_outgoing_is_einval_even_with_good_struct(session: Any) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_FINISH, _abi.FINISH.pack(_abi.FINISH.size, 0))


def test_session_ioctl_on_device_fd_is_einval(dev: Any) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(dev, _abi.SESSION_GET_NAME, _abi.GET_NAME.pack(_abi.GET_NAME.size, 0, b""))


def test_device_ioctl_on_session_fd_is_einval(session: Any) -> None:
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.IOCTL_CREATE_SESSION, create_arg(b"on-a-session"))
