"""Writing the preserved-memory image so that a crash never leaves a torn one.

The image is replaced, never rewritten in place: the new bytes go to a
temporary file in the same directory, which is fsynced, renamed over the
image (atomic on POSIX file systems), and the directory is fsynced so the
rename itself survives a power cut. A service killed at any point leaves
either the previous complete image or the new complete one, plus at worst a
temporary file that the next start removes.
"""
from __future__ import annotations

import glob
import os
import signal
from typing import List

__all__ = ["write_atomically", "remove_stale_temporaries", "temporary_path", "FAULT_ENV"]

#: Fault injection for tests: ``stop-before-rename`` makes the writer stop
#: itself (SIGSTOP) once the temporary file is complete but before the rename,
#: ``stop-mid-write`` once half of it is written. A test then SIGKILLs the
#: service at exactly that point. Unset in normal use.
FAULT_ENV = "LIVEUPDATE_SERVICE_FAULT"


def temporary_path(path: str) -> str:
    """Where the next image of ``path`` is written before the rename; the pid
    keeps two services pointed at one image from clobbering each other."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp.{os.getpid()}")


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGSTOP)


def write_atomically(path: str, data: bytes) -> None:
    """Replace the file ``path`` with ``data``.

    Raises OSError from the writes, fsyncs or rename (ENOSPC, EACCES ...);
    the file at ``path`` is then untouched and the temporary file removed."""
    path = os.path.abspath(path)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            half = len(view) // 2
            _write_all(fd, view[:half])
            if os.environ.get(FAULT_ENV) == "stop-mid-write":
                os.fsync(fd)  # make the torn state what a crash would leave on disk
                _fault("stop-mid-write")
            _write_all(fd, view[half:])
            os.fsync(fd)
        finally:
            os.close(fd)
        _fault("stop-before-rename")
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_path(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete temporary images left by writers that died before their rename;
    returns what was removed. Only files of dead pids go: a live writer keeps
    its own."""
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
