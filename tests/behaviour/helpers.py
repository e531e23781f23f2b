"""Small helpers shared by the behaviour tests (no fixtures here)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Any, Iterator

import pytest

from liveupdate import _abi


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def close_handle(handle: Any) -> None:
    """Close a Device or Session at teardown. A handle of a kernel that an
    emulated kexec replaced may refuse with ESTALE; its fd is gone anyway."""
    try:
        handle.close()
    except OSError as exc:
        if exc.errno != errno.ESTALE:
            raise


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[Any]:
    """Expect an OSError carrying ``code``; shows the name of what came instead."""
    with pytest.raises(OSError) as info:
        yield info
    got = info.value.errno
    assert got == code, (
        f"expected {errno.errorcode[code]}, got {errno.errorcode.get(got, got)}: {info.value}"
    )


def raw_ioctl(handle: Any, cmd: int, arg: bytes) -> bytes:
    """Send an argument struct as is, past the API's own checks, to the
    backend behind a Device or Session (the kernel selftests do the same
    with ioctl(2)). Raises the backend's OSError unchanged."""
    return handle._port.ioctl(handle.fileno(), cmd, arg)


def create_arg(name: bytes, size: int = _abi.CREATE_SESSION.size) -> bytes:
    """A create/retrieve-session struct; ``name`` is copied raw (no NUL added)."""
    assert len(name) <= _abi.NAME_LENGTH
    return _abi.CREATE_SESSION.pack(size, -1, name)


def contents(fd: int, length: int = 1 << 16) -> bytes:
    """The file's bytes from offset 0, leaving its position alone."""
    return os.pread(fd, length, 0)


def is_cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def same_file(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
