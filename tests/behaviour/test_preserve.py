"""PRESERVE_FD on an outgoing session: which files, which errors, in which order.

The order of checks is luo_preserve_file()'s (kernel/liveupdate/luo_file.c):
token already used in the session (EEXIST), room in the block chain
(ENOSPC), the fd (EBADF), a handler that takes the file (ENOENT), the file
not preserved anywhere yet (EBUSY, keyed by inode), then the memfd
handler's own checks in memfd_luo_preserve() (mm/memfd_luo.c): seals it
knows (EOPNOTSUPP), at most UINT_MAX pages (EFBIG).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from typing import Any, Callable

import pytest

from .helpers import close_quietly, contents, raises_errno

PAGE = os.sysconf("SC_PAGE_SIZE")
# memfd_luo_preserve() refuses DIV_ROUND_UP(size, PAGE_SIZE) > UINT_MAX.
EFBIG_SIZE = (2**32 - 1) * PAGE + 1

ALL_SEALS = (
    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10) | 0x20  # F_SEAL_EXEC
)


@pytest.fixture
def session(dev: Any, track: Callable) -> Any:
    return track(dev.create_session("preserve-tests"))


def test_token_reused_in_session_is_eexist(session: Any, memfd: Callable) -> None:
    session.preserve(memfd(), 7)
    with raises_errno(errno.EEXIST):
        session.preserve(memfd(), 7)


def test_same_token_in_two_sessions_is_fine(dev: Any, track: Callable, memfd: Callable) -> None:
    a = track(dev.create_session("token-scope-a"))
    b = track(dev.create_session("token-scope-b"))
    a.preserve(memfd(), 1)
    b.preserve(memfd(), 1)


def test_token_extremes(session: Any, memfd: Callable) -> None:
    session.preserve(memfd(), 0)
    session.preserve(memfd(), 2**64 - 1)
    with raises_errno(errno.EEXIST):
        session.preserve(memfd(), 2**64 - 1)


def test_closed_fd_is_ebadf(session: Any) -> None:
    fd = os.memfd_create("gone")
    os.close(fd)
    with raises_errno(errno.EBADF):
        session.preserve(fd, 1)


def test_negative_fd_is_ebadf(session: Any) -> None:
    with raises_errno(errno.EBADF):
        session.preserve(-1, 1)


def test_used_token_wins_over_bad_fd(session: Any, memfd: Callable) -> None:
    # The token check comes first in luo_preserve_file().
    session.preserve(memfd(), 5)
    fd = os.memfd_create("gone")
    os.close(fd)
    with raises_errno(errno.EEXIST):
        session.preserve(fd, 5)


@pytest.mark.parametrize("kind", ["pipe", "socket", "regular file", "directory", "eventfd"])
def test_files_without_a_handler_are_enoent(session: Any, cleanup: Any, kind: str) -> None:
    if kind == "pipe":
        r, w = os.pipe()
        cleanup.callback(close_quietly, w)
        fd = r
    elif kind == "socket":
        fd = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()
    elif kind == "regular file":
        # A linked file: even on tmpfs it has links, so no handler takes it.
        fd = os.open(__file__, os.O_RDONLY)
    elif kind == "directory":
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    else:
        if not hasattr(os, "eventfd"):
            pytest.skip("os.eventfd needs Python 3.10")
        fd = os.eventfd(0)
    cleanup.callback(close_quietly, fd)
    with raises_errno(errno.ENOENT):
        session.preserve(fd, 1)


def test_session_fd_itself_is_enoent(session: Any, dev: Any, track: Callable) -> None:
    other = track(dev.create_session("preserve-a-session"))
    with raises_errno(errno.ENOENT):
        session.preserve(other.fileno(), 1)


def _tmpfs_dir() -> str:
    path = "/dev/shm"
    if not os.path.isdir(path):
        pytest.skip("no /dev/shm")
    # os.statvfs has no f_type: read the mount table instead.
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[1] == path and fields[2] == "tmpfs":
                return path
    pytest.skip("/dev/shm is not tmpfs")
    return path


def test_linked_tmpfs_file_is_enoent_unlinked_one_is_preserved(session: Any, cleanup: Any) -> None:
    # memfd_luo_can_preserve(): any shmem file with no links, not only
    # memfd_create()'s: a tmpfs file qualifies once it is unlinked.
    directory = _tmpfs_dir()
    fd, path = tempfile.mkstemp(dir=directory, prefix="luo-test-")
    cleanup.callback(close_quietly, fd)
    try:
        os.write(fd, b"tmpfs")
        with raises_errno(errno.ENOENT):
            session.preserve(fd, 1)
    finally:
        os.unlink(path)
    session.preserve(fd, 1)


def test_hugetlb_memfd_is_rejected(session: Any, cleanup: Any) -> None:
    # Not a shmem file: memfd_luo_can_preserve() says no, so ENOENT.
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"this kernel makes no hugetlb memfds: {exc}")
    cleanup.callback(close_quietly, fd)
    with raises_errno(errno.ENOENT):
        session.preserve(fd, 1)


def test_every_seal_the_handler_knows_is_accepted(session: Any, memfd: Callable) -> None:
    # MEMFD_LUO_ALL_SEALS covers every seal fcntl() can set today, so
    # EOPNOTSUPP cannot be provoked from user space; the emulator tests reach
    # it through a corrupted image instead.
    fd = memfd(b"sealed", flags=os.MFD_ALLOW_SEALING)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS)
    except OSError:
        # F_SEAL_EXEC needs Linux 6.3: fall back to the older five.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS & ~0x20)
    session.preserve(fd, 1)
    assert contents(fd) == b"sealed"


def test_too_large_is_efbig_and_leaves_the_file_free(session: Any, memfd: Callable) -> None:
    fd = memfd()
    try:
        os.ftruncate(fd, EFBIG_SIZE)
    except OSError as exc:
        pytest.skip(f"cannot make a sparse memfd of {EFBIG_SIZE} bytes here: {exc}")
    with raises_errno(errno.EFBIG):
        session.preserve(fd, 1)
    # The failure undid everything: same token, same file, now small enough.
    os.ftruncate(fd, PAGE)
    session.preserve(fd, 1)


def test_failed_preserve_does_not_use_the_token(session: Any, memfd: Callable, cleanup: Any) -> None:
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    cleanup.callback(close_quietly, null)
    with raises_errno(errno.ENOENT):
        session.preserve(null, 3)
    session.preserve(memfd(), 3)


def test_closing_the_memfd_keeps_it_preserved(session: Any, memfd: Callable) -> None:
    # The kernel holds its own reference to a preserved file: closing the
    # caller's fd changes nothing, the token stays taken.
    fd = os.memfd_create("short-lived")
    os.write(fd, b"x" * 100)
    session.preserve(fd, 1)
    os.close(fd)
    with raises_errno(errno.EEXIST):
        session.preserve(memfd(), 1)
