"""A session or the device is released when its *last* fd goes, not when
one fd is closed: the kernel's release() runs on the final fput() of the
file (luo_session_release(), luo_release()). So a dup, or a child process
that inherited the fd, keeps a session alive and its files preserved, and
keeps the device held."""
from __future__ import annotations

import contextlib
import errno
import os
import resource
from typing import Any, Callable, Iterator

from liveupdate import _abi

from .helpers import close_quietly, create_arg, raises_errno, raw_ioctl


@contextlib.contextmanager
def child_holding(*fds: int) -> Iterator[None]:
    """A forked child that holds its inherited copies of ``fds`` (fork keeps
    them all) until the block ends, then exits."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the parent to let go, touch nothing else
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    try:
        yield
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_session_lives_while_a_dup_is_open(dev: Any, track: Callable, memfd: Callable) -> None:
    session = dev.create_session("held-by-dup")
    fd = memfd(b"kept")
    session.preserve(fd, 1)
    copy = os.dup(session.fileno())
    session.close()
    try:
        with raises_errno(errno.EEXIST):
            track(dev.create_session("held-by-dup"))
        other = track(dev.create_session("held-by-dup-other"))
        with raises_errno(errno.EBUSY):
            other.preserve(fd, 1)
    finally:
        os.close(copy)
    # The last fd is gone: released, its file unpreserved.
    track(dev.create_session("held-by-dup"))
    other.preserve(fd, 1)


def test_session_lives_while_a_child_holds_it(dev: Any, track: Callable, memfd: Callable) -> None:
    session = dev.create_session("held-by-child")
    fd = memfd(b"kept")
    session.preserve(fd, 1)
    try:
        with child_holding(session.fileno()):
            session.close()
            with raises_errno(errno.EEXIST):
                track(dev.create_session("held-by-child"))
    finally:
        session.close()
    again = track(dev.create_session("held-by-child"))
    again.preserve(fd, 1)


def test_device_stays_busy_while_a_child_holds_it(backend: Any) -> None:
    device = backend.open()
    try:
        with child_holding(device.fileno()):
            device.close()
            with raises_errno(errno.EBUSY):
                backend.open().close()
    finally:
        device.close()
    backend.open().close()


def test_raw_create_takes_its_fd_before_looking_at_the_name(dev: Any, cleanup: Any) -> None:
    # luo_ioctl_create_session(): get_unused_fd_flags() comes first, so with
    # no fd left even an empty name is EMFILE.
    lowest = os.dup(2)
    os.close(lowest)
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, saved[1]))
    try:
        with raises_errno(errno.EMFILE):
            out = raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b""))
            cleanup.callback(close_quietly, _abi.CREATE_SESSION.unpack(out)[1])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    with raises_errno(errno.EINVAL):
        raw_ioctl(dev, _abi.IOCTL_CREATE_SESSION, create_arg(b""))
