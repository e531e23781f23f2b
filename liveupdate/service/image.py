"""The service's preserved-memory image, replaced atomically at each kexec.

The writing itself is :mod:`liveupdate._atomic`: a service killed at any
point leaves either the previous complete image or the new complete one,
plus at worst a temporary file that the next start removes. This module adds
the fault points the tests use to kill the service at exactly those moments.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional

from .._atomic import remove_stale_temporaries, temporary_path
from .._atomic import write_atomically as _write_atomically

__all__ = ["write_atomically", "remove_stale_temporaries", "temporary_path", "FAULT_ENV"]

#: Fault injection for tests: ``stop-before-rename`` makes the writer stop
#: itself (SIGSTOP) once the temporary file is complete but before the rename,
#: ``stop-mid-write`` once half of it is written. A test then SIGKILLs the
#: service at exactly that point. Unset in normal use.
FAULT_ENV = "LIVEUPDATE_SERVICE_FAULT"


def _checkpoint(point: str, fd: Optional[int]) -> None:
    if os.environ.get(FAULT_ENV) != f"stop-{point}":
        return
    if fd is not None:
        os.fsync(fd)  # make the torn state what a crash would leave on disk
    # Sent to this thread (the kexec runs on the service's worker thread),
    # which then stops before its next step; a signal to the process could
    # be taken by another thread while this one renames.
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def write_atomically(path: str, data: bytes) -> None:
    """Replace the image at ``path`` with ``data`` (see :mod:`liveupdate._atomic`).

    Raises OSError from the writes, fsyncs or rename (ENOSPC, EACCES ...);
    the image at ``path`` is then untouched."""
    _write_atomically(path, data, _checkpoint)
