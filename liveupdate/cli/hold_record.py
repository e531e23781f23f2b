"""The record a ``liveupdate hold`` holder leaves, and finding that holder
for sure (for ``release``).

A pid alone names a process only while it lives: once the holder is gone
(a crash, a kexec, a reboot) the number may belong to anyone, and
signalling it would stop an unrelated process. So the record keeps, beside
the pid, the boot it was made in (``/proc/sys/kernel/random/boot_id``) and
the process's start time (field 22 of ``/proc/PID/stat``, in clock ticks
since boot): the pair (boot, pid, start time) names one process of the
machine's whole life. ``release`` opens a pidfd first and checks the start
time after, so that a pid reused between the two cannot be the one the
pidfd signals; without pidfd_open (Linux before 5.3) it falls back to
``kill()`` right after the same check.

Records are small JSON files written atomically (:mod:`liveupdate._atomic`)
and read without following links, from regular files only, at most
:data:`RECORD_MAX` bytes.
"""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import stat
import time
from typing import Any, Dict, Optional

from .. import _atomic
from ._common import CommandError

__all__ = ["RECORD_MAX", "boot_id", "process_start", "write", "read", "Holder", "find"]

#: A record is a few hundred bytes; anything much larger is not one.
RECORD_MAX = 64 * 1024
_STAT_MAX = 4096  # /proc/PID/stat is one line of a few hundred bytes


def _read_small(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def boot_id(proc: str = "/proc") -> str:
    """This boot's random id ('' when /proc does not say)."""
    try:
        return _read_small(os.path.join(proc, "sys/kernel/random/boot_id"), 128).decode("ascii", "replace").strip()
    except OSError:
        return ""


def process_start(pid: int, proc: str = "/proc") -> Optional[int]:
    """When process ``pid`` started (clock ticks since boot), or None when
    there is no such process."""
    try:
        text = _read_small(os.path.join(proc, str(pid), "stat"), _STAT_MAX).decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses,
    # so the fields are counted from the last ')'.
    fields = text[text.rfind(")") + 1:].split()
    try:
        return int(fields[19])  # field 22 overall: starttime
    except (IndexError, ValueError):
        return None


def write(path: str, pid: int, session: str, tokens: Any, **extra: Any) -> None:
    """Record that ``pid`` (this process) holds ``session``."""
    data = {"format": 2, "pid": pid, "start": process_start(pid), "boot_id": boot_id(), "session": session,
            "tokens": list(tokens), "since": time.time(), **extra}
    _atomic.write_atomically(path, json.dumps(data).encode("utf-8"))


def _malformed(path: str, why: str) -> CommandError:
    return CommandError(f"the holder record {path} is not one `liveupdate hold` writes ({why})",
                        f"it cannot say which process holds the session, so none is signalled; find the holder "
                        f"(`liveupdate status` lists session holders), stop it yourself, then remove {path}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read(path: str) -> Optional[Dict[str, Any]]:
    """The record at ``path``, None when there is none.

    Raises CommandError (one line) for a record that is not one: a link, not
    a regular file, too large, not JSON, or JSON of another shape (an older
    record without a start time included: its holder cannot be identified)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _malformed(path, "it is a symbolic link") from None
        raise CommandError(f"cannot read the holder record {path}: {exc.strerror}",
                           "check the state directory's permissions") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _malformed(path, "not a regular file")
        raw = os.read(fd, RECORD_MAX + 1)
    finally:
        os.close(fd)
    if len(raw) > RECORD_MAX:
        raise _malformed(path, f"larger than {RECORD_MAX} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _malformed(path, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _malformed(path, f"a JSON {type(data).__name__}, not an object")
    if not _is_int(data.get("pid")) or data["pid"] <= 0:
        raise _malformed(path, "no positive integer pid")
    if "start" not in data:
        raise _malformed(path, "no process start time: written by an older version")
    if not _is_int(data["start"]) or data["start"] < 0:
        raise _malformed(path, "the start time is not a number of clock ticks")
    if not isinstance(data.get("boot_id"), str):
        raise _malformed(path, "no boot id")
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise _malformed(path, "tokens is not a list of numbers")
    if not isinstance(data.get("session"), str):
        raise _malformed(path, "no session name")
    return data


class Holder:
    """A live holder found for sure: signal it and wait for its end."""

    def __init__(self, pid: int, pidfd: Optional[int]) -> None:
        self.pid = pid
        self._pidfd = pidfd

    def terminate(self) -> None:
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
        else:
            os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """True once the holder has exited, False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)  # readable once the process exited
            return bool(poller.poll(max(0, int(timeout * 1000))))
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def find(data: Dict[str, Any]) -> Optional[Holder]:
    """The process the record names if it still runs, else None (it ended,
    or the machine booted since, and the pid may be someone else's now)."""
    pid = data["pid"]
    if data["boot_id"] != boot_id():
        return None
    pidfd: Optional[int]
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (AttributeError, OSError):
        pidfd = None  # no pidfd_open: the start time check below still holds
    # Checked after the pidfd is taken: a pid reused in between has
    # another start time, and the pidfd then names that other process.
    if process_start(pid) != data["start"]:
        if pidfd is not None:
            os.close(pidfd)
        return None
    return Holder(pid, pidfd)
