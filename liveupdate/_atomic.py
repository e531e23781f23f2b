"""Replacing a file so that a crash never leaves a torn one (private).

The new bytes go to a temporary file in the same directory, which is
fsynced, renamed over the target (atomic on POSIX file systems), and the
directory is fsynced so that the rename itself survives a power cut. A
writer killed at any point leaves the previous complete file or the new
complete one, plus at worst a temporary file named after its pid, which
:func:`remove_stale_temporaries` clears.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, List, Optional

__all__ = ["write_atomically", "temporary_path", "remove_stale_temporaries"]

#: Called at "mid-write" (with the temporary fd) and "before-rename" (None):
#: lets tests stop a writer at exactly the moments a crash matters.
Checkpoint = Callable[[str, Optional[int]], None]


def temporary_path(path: str) -> str:
    """Where the next version of ``path`` is written before the rename; the
    pid keeps two writers of one file from clobbering each other."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp.{os.getpid()}")


def write_atomically(path: str, data: bytes, checkpoint: Optional[Checkpoint] = None) -> None:
    """Replace the file ``path`` with ``data`` (mode 0600).

    Raises OSError from the writes, fsyncs or rename (ENOSPC, EACCES ...);
    the file at ``path`` is then untouched and the temporary file removed."""
    path = os.path.abspath(os.fspath(path))
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            half = len(view) // 2
            _write_all(fd, view[:half])
            if checkpoint is not None:
                checkpoint("mid-write", fd)
            _write_all(fd, view[half:])
            os.fsync(fd)
        finally:
            os.close(fd)
        if checkpoint is not None:
            checkpoint("before-rename", None)
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


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete temporary files left by writers of ``path`` that died before
    their rename; returns what was removed. A live writer keeps its own."""
    directory, name = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp.*")):
        pid_text = tmp.rsplit(".", 1)[-1]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _alive(pid):
            continue
        try:
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
    return True
