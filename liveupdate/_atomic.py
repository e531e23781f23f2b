"""Replacing a file so that a crash never leaves a torn one (private).

The new bytes go to a temporary file in the same directory, which is
fsynced, renamed over the target (atomic on POSIX file systems), and the
directory is fsynced so that the rename itself survives a power cut. A
writer killed at any point leaves the previous complete file or the new
complete one, plus at worst a temporary file named after its pid, which
:func:`remove_stale_temporaries` clears.

Hostile directories: in a shared (sticky) directory another user may plant
a symbolic link, or any file, where a writer is about to create one. The
temporary file's name carries 64 random bits besides the pid (so it cannot
be guessed in advance) and it is created with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` (so an existing name, link or not, is never opened: another
name is drawn). The final path is checked before anything is written: a
symbolic link there is refused (ELOOP), a directory (EISDIR) or any other
file that is not a regular file (EINVAL); the rename replaces a name, never
writes through a link.

:func:`atomic_writer` streams: the caller writes its data piece by piece and
the file is committed (fsync, rename, fsync of the directory) only when the
``with`` block ends without an exception, so no caller needs the whole file
in one buffer. :func:`write_atomically` is the one-buffer form.
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
import stat
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

__all__ = ["write_atomically", "atomic_writer", "AtomicWriter", "temporary_path", "remove_stale_temporaries",
           "check_target"]

#: Called at "mid-write" (with the temporary fd) and "before-rename" (None):
#: lets tests stop a writer at exactly the moments a crash matters.
Checkpoint = Callable[[str, Optional[int]], None]

_TRIES = 16


def temporary_path(path: str) -> str:
    """Where the next version of ``path`` is written before the rename: the
    pid (so that :func:`remove_stale_temporaries` can tell a live writer's
    file) and 64 random bits (so that nobody can plant a file there first)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp.{os.getpid()}.{secrets.token_hex(8)}")


def check_target(path: str) -> None:
    """Refuse a final path that is a symbolic link or not a regular file.

    Raises OSError: ELOOP (a symbolic link), EISDIR (a directory), EINVAL
    (a FIFO, socket or device); the errno of lstat other than ENOENT."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, f"refusing to replace {path}: it is a symbolic link "
                                   f"(remove it or give the real path)", path)
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, f"refusing to replace {path}: it is a directory", path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"refusing to replace {path}: it is not a regular file", path)


def _create_temporary(path: str) -> "tuple[str, int]":
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_TRIES):
        tmp = temporary_path(path)
        try:
            return tmp, os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue  # someone holds that name (planted or not): draw another
    raise OSError(errno.EEXIST, f"no free temporary name next to {path} after {_TRIES} tries", path)


class AtomicWriter:
    """The open temporary file of :func:`atomic_writer`: ``write(data)``
    appends, ``fd`` is its descriptor (``os.pwrite`` on it may patch bytes
    already written), ``written`` counts the bytes appended."""

    def __init__(self, fd: int, checkpoint: Optional[Checkpoint]) -> None:
        self.fd = fd
        self.written = 0
        self._checkpoint = checkpoint
        self._writes = 0

    def write(self, data: "bytes | bytearray | memoryview") -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.written += len(data)
        self._writes += 1
        if self._writes == 2:
            self.midpoint()

    def midpoint(self) -> None:
        """The "mid-write" checkpoint, once: part of the data is written."""
        if self._checkpoint is not None:
            checkpoint, self._checkpoint = self._checkpoint, None
            checkpoint("mid-write", self.fd)
            self._checkpoint = checkpoint
            self._writes = 3  # fired

    def _finish(self) -> None:
        if self._writes < 3:
            self.midpoint()


@contextmanager
def atomic_writer(path: str, checkpoint: Optional[Checkpoint] = None) -> Iterator[AtomicWriter]:
    """``with atomic_writer(path) as out: out.write(...)``: replace the file
    ``path`` (mode 0600) with what was written, when the block ends without
    an exception; otherwise the temporary file is removed and ``path`` is
    untouched.

    Raises OSError: see :func:`check_target` (before anything is written);
    the errno of the writes, fsyncs or rename (ENOSPC, EACCES, EROFS ...)."""
    path = os.path.abspath(os.fspath(path))
    check_target(path)
    tmp, fd = _create_temporary(path)
    try:
        try:
            writer = AtomicWriter(fd, checkpoint)
            yield writer
            writer._finish()
            os.fsync(fd)
        finally:
            os.close(fd)
        if checkpoint is not None:
            checkpoint("before-rename", None)
        check_target(path)  # nothing planted there while we wrote
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_atomically(path: str, data: bytes, checkpoint: Optional[Checkpoint] = None) -> None:
    """Replace the file ``path`` with ``data`` (mode 0600).

    Raises OSError from the checks of :func:`check_target`, the writes,
    fsyncs or rename (ENOSPC, EACCES ...); the file at ``path`` is then
    untouched and the temporary file removed."""
    view = memoryview(data)
    half = len(view) // 2
    with atomic_writer(path, checkpoint) as out:
        out.write(view[:half])
        out.midpoint()
        out.write(view[half:])


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete temporary files left by writers of ``path`` that died before
    their rename; returns what was removed. A live writer keeps its own."""
    directory, name = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp.*")):
        parts = tmp[len(os.path.join(directory, f".{name}.tmp.")):].split(".")
        # .NAME.tmp.PID.RANDOM (and .NAME.tmp.PID from older writers)
        if not parts[0].isdecimal() or not parts[0].isascii() or len(parts) > 2:
            continue
        pid = int(parts[0])
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            st = os.lstat(tmp)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue  # not a file a writer of ours made: not ours to delete
            os.unlink(tmp)
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True
