"""The few host facts the emulator needs that :mod:`os` does not expose."""
from __future__ import annotations

import errno
import fcntl
import os
import resource
import struct
from typing import Callable, Dict, Optional

import cffi

__all__ = ["fs_magic", "kernel_fd", "kernel_dup", "kernel_pipe", "TMPFS_MAGIC", "F_ADD_SEALS", "F_GET_SEALS", "MAX_LFS_FILESIZE"]

TMPFS_MAGIC = 0x01021994
# fcntl commands for seals (F_LINUX_SPECIFIC_BASE + 9 / + 10).
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
MAX_LFS_FILESIZE = 2**63 - 1

_ffi = cffi.FFI()
_ffi.cdef("int fstatfs(int fd, void *buf);")
_libc = _ffi.dlopen(None)
# f_type is the first member of struct statfs on every Linux ABI, a native
# word; 256 bytes cover the whole struct everywhere.
_WORD = struct.Struct("=l" if _ffi.sizeof("long") == 8 else "=i")
_by_dev: Dict[int, int] = {}


def _limits() -> "tuple[int, int]":
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _can_hide(soft: int, hard: int) -> bool:
    inf = resource.RLIM_INFINITY
    return soft != inf and hard != inf and soft < hard


def _target(soft: int, hard: int) -> Optional[int]:
    """The lowest number for an fd of the emulator's own: in the upper half
    of what the hard limit allows and above the soft limit when there is
    room, else in the upper half of the allowed numbers; away from the low
    numbers programs use and count either way."""
    if _can_hide(soft, hard):
        # High up, so that a lower limit the program sets later (or a
        # program that counts its fds from the lowest free one) does not
        # meet them either.
        return max(soft, hard // 2)
    if soft != resource.RLIM_INFINITY and soft >= 256:
        return soft // 2
    return None


def kernel_fd(make: Callable[[], int]) -> int:
    """Run ``make()`` (which opens one fd the emulator keeps for itself)
    and move the fd out of the program's way.

    The kernel holds its file references without using the process's fds;
    the emulator cannot, but it keeps its own fds out of the numbers the
    program is allowed (at or above the soft RLIMIT_NOFILE, which is raised
    to the hard one for the duration of the call: other threads see it
    raised for that long). The program then gets exactly the fd budget a
    real kernel leaves it: EMFILE where the kernel says EMFILE, success
    where the kernel needs no fd. When the soft limit already is the hard
    one, the fd goes to the upper half of the allowed numbers, so it still
    sits above the low numbers a program allocates (and above any lower
    limit the program sets later)."""
    soft, hard = _limits()
    target = _target(soft, hard)
    # Raise only when the target is out of the numbers allowed now.
    raised = target is not None and target >= soft and _can_hide(soft, hard)
    if raised:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        fd = make()
        if target is not None and fd < target:
            try:
                high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, target)
            except OSError:
                return fd  # nothing free up there: keep it where it is
            os.close(fd)
            fd = high
        return fd
    finally:
        if raised:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def kernel_dup(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` for the emulator's own use,
    out of the program's way (see :func:`kernel_fd`); one system call in
    the common case."""
    soft, hard = _limits()
    target = _target(soft, hard)
    if target is not None and target < soft:
        try:
            return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, target)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.EINVAL):
                raise
    return kernel_fd(lambda: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0))


def kernel_pipe() -> "tuple[int, int]":
    """A close-on-exec pipe whose read end is the emulator's (kept out of
    the program's way, see :func:`kernel_fd`) and whose write end is the
    caller's: one fd of the caller's budget (EMFILE when there is none)."""
    soft = _limits()[0]
    ends: "list[int]" = []

    def read_end() -> int:
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        ends.append(wfd)
        return rfd

    rfd = kernel_fd(read_end)
    wfd = ends.pop()
    # The write end may have been opened under a raised limit, and the
    # kernel would have given the caller the lowest free number (perhaps
    # the one the read end briefly had): move it there, or fail as the
    # kernel does when the caller has no fd left.
    try:
        low = fcntl.fcntl(wfd, fcntl.F_DUPFD_CLOEXEC, 0)
    except OSError:
        if soft == resource.RLIM_INFINITY or wfd < soft:
            return rfd, wfd
        os.close(wfd)
        os.close(rfd)
        raise
    if low < wfd:
        os.close(wfd)
        return rfd, low
    os.close(low)
    return rfd, wfd


def fs_magic(fd: int, st_dev: int) -> int:
    """The file system type (statfs f_type) of ``fd``; cached per device,
    since a device number names one mounted file system."""
    magic = _by_dev.get(st_dev)
    if magic is None:
        buf = _ffi.new("unsigned char[256]")
        if _libc.fstatfs(fd, buf) != 0:
            err = _ffi.errno
            raise OSError(err, os.strerror(err))
        magic = _WORD.unpack_from(_ffi.buffer(buf))[0] & 0xFFFFFFFF
        _by_dev[st_dev] = magic
    return magic
