"""How many fds each operation costs the caller, under RLIMIT_NOFILE.

The kernel allocates exactly one fd for a new session (create or
retrieve: get_unused_fd_flags() in luo_ioctl_create_session() and
luo_ioctl_retrieve_session()) and one for a retrieved file
(luo_session_retrieve_fd(); tested in test_after_kexec.py), and none at all to preserve a file
(luo_preserve_file() takes a reference with fget()). So a process at its fd
limit can still preserve, and N sessions fit in N free fds -- which is what
the selftests' luo_ensure_nofile_limit(N) relies on.
"""
from __future__ import annotations

import contextlib
import errno
import os
import resource
from typing import Any, Callable, Iterator

from .helpers import raises_errno


def lowest_free_fd() -> int:
    # dup() returns the lowest free number, which is the number in question.
    fd = os.dup(2)
    os.close(fd)
    return fd


@contextlib.contextmanager
def fd_limit(free: int) -> Iterator[None]:
    """Let the process open exactly ``free`` more fds (numbers below the
    current lowest free one are all taken, so the limit is that plus
    ``free``); restored on exit."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd() + free, saved[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_preserve_needs_no_free_fd(dev: Any, track: Callable, memfd: Callable) -> None:
    session = track(dev.create_session("fd-budget-preserve"))
    fds = [memfd(b"%d" % i) for i in range(3)]
    with fd_limit(0):
        for token, fd in enumerate(fds):
            session.preserve(fd, token)


def test_each_session_costs_one_fd(dev: Any, track: Callable, cleanup: Any) -> None:
    count = 20
    made = []
    cleanup.callback(lambda: [s.close() for s in made])
    with fd_limit(count):
        for i in range(count):
            made.append(dev.create_session(f"fd-budget-{i}"))
        with raises_errno(errno.EMFILE):
            made.append(dev.create_session("fd-budget-one-too-many"))
