"""A file is preserved at most once, whatever fd names it.

The kernel keys preserved files by the memfd handler's get_id(), the inode
(memfd_luo_get_id() in mm/memfd_luo.c), in one table shared by every
session (luo_preserved_files in kernel/liveupdate/luo_file.c). So a dup'ed
fd, a second open of the same memfd through /proc, and another session all
see EBUSY; unpreserving (closing the outgoing session) frees the file again.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Callable

from .helpers import close_quietly, raises_errno


def test_dup_fd_is_ebusy(dev: Any, track: Callable, memfd: Callable, cleanup: Any) -> None:
    session = track(dev.create_session("ebusy-dup"))
    fd = memfd(b"data")
    session.preserve(fd, 1)
    copy = os.dup(fd)
    cleanup.callback(close_quietly, copy)
    with raises_errno(errno.EBUSY):
        session.preserve(copy, 2)


def test_reopened_through_proc_is_ebusy(dev: Any, track: Callable, memfd: Callable, cleanup: Any) -> None:
    # A new open file description of the same inode: still the same file.
    session = track(dev.create_session("ebusy-reopen"))
    fd = memfd(b"data")
    session.preserve(fd, 1)
    again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    cleanup.callback(close_quietly, again)
    assert os.fstat(again).st_ino == os.fstat(fd).st_ino
    with raises_errno(errno.EBUSY):
        session.preserve(again, 2)


def test_dup_fd_in_other_session_is_ebusy(dev: Any, track: Callable, memfd: Callable, cleanup: Any) -> None:
    a = track(dev.create_session("ebusy-across-a"))
    b = track(dev.create_session("ebusy-across-b"))
    fd = memfd()
    a.preserve(fd, 1)
    copy = os.dup(fd)
    cleanup.callback(close_quietly, copy)
    with raises_errno(errno.EBUSY):
        b.preserve(copy, 1)


def test_ebusy_does_not_take_the_token(dev: Any, track: Callable, memfd: Callable) -> None:
    a = track(dev.create_session("ebusy-token-a"))
    b = track(dev.create_session("ebusy-token-b"))
    fd = memfd()
    a.preserve(fd, 1)
    with raises_errno(errno.EBUSY):
        b.preserve(fd, 9)
    b.preserve(memfd(), 9)


def test_closing_outgoing_session_unpreserves(dev: Any, track: Callable, memfd: Callable) -> None:
    first = track(dev.create_session("unpreserve-first"))
    fd = memfd(b"kept by the caller")
    first.preserve(fd, 1)
    first.close()
    # luo_session_release() -> luo_file_unpreserve_files(): the file is free.
    second = track(dev.create_session("unpreserve-second"))
    second.preserve(fd, 1)
    assert os.pread(fd, 64, 0) == b"kept by the caller"


def test_closed_session_name_is_free_again(dev: Any, track: Callable, memfd: Callable) -> None:
    session = track(dev.create_session("reusable-name"))
    fd = memfd()
    session.preserve(fd, 1)
    session.close()
    again = track(dev.create_session("reusable-name"))
    again.preserve(fd, 1)


def test_distinct_memfds_with_same_contents_are_distinct(dev: Any, track: Callable, memfd: Callable) -> None:
    session = track(dev.create_session("distinct-files"))
    session.preserve(memfd(b"same"), 1)
    session.preserve(memfd(b"same"), 2)


def test_many_files_then_close_frees_them_all(dev: Any, track: Callable, memfd: Callable) -> None:
    # More files than one block holds (63), so the chain grows and shrinks.
    fds = [memfd() for _ in range(130)]
    session = track(dev.create_session("free-them-all"))
    for token, fd in enumerate(fds):
        session.preserve(fd, token)
    session.close()
    again = track(dev.create_session("free-them-all"))
    for token, fd in enumerate(fds):
        again.preserve(fd, token)
