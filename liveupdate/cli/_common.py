"""What every subcommand shares: one-line errors with a hint, progress."""
from __future__ import annotations

import errno
import sys
from typing import Optional, TextIO

from ..errors import LiveUpdateError

__all__ = ["CommandError", "fail", "generic_hint", "progress"]


class CommandError(Exception):
    """A failure the command reports as one line, with a hint at the fix.

    ``main()`` prints ``liveupdate <command>: <message> (hint: <hint>)`` on
    stderr and exits with ``code``."""

    def __init__(self, message: str, hint: Optional[str] = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def line(self, prog: str) -> str:
        text = f"{prog}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        # One line whatever the message holds: a multi-line error is hard to
        # grep and to read in a journal.
        return " ".join(text.split())


_GENERIC_HINTS = {
    errno.EPERM: "run it as root",
    errno.EACCES: "run it as root, or as a user allowed to read/write the file",
    errno.ENOENT: "check the path",
    errno.EBUSY: "another process holds /dev/liveupdate (only one at a time); "
    "see `liveupdate status` for which",
    errno.ENOSPC: "the kernel's limit was reached; free some sessions or files first",
    errno.ENOMEM: "the machine is short of memory",
    errno.ENOTTY: "this fd is no Live Update session",
    errno.EMFILE: "this process has no fd left: close some, or raise its limit (ulimit -n)",
    errno.EISDIR: "give a file, not a directory",
}


def generic_hint(exc: OSError) -> Optional[str]:
    """A hint that fits an errno whatever the command."""
    return _GENERIC_HINTS.get(exc.errno or 0)


def fail(exc: OSError, hint: Optional[str] = None) -> CommandError:
    """Turn a library error into the command's one-line failure."""
    if isinstance(exc, LiveUpdateError) or exc.errno is None:
        # The library's messages already name the call, its arguments and
        # the errno; str() would prefix a redundant "[Errno N]".
        message = exc.strerror or str(exc)
    else:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        message = f"{exc.strerror} ({code})"
        if exc.filename is not None:
            message = f"{exc.filename}: {message}"
    return CommandError(message, hint or generic_hint(exc))


def progress(text: str, stream: Optional[TextIO] = None) -> None:
    """Say what long work is doing now (on stderr, so stdout stays data)."""
    out = stream or sys.stderr
    out.write(text + "\n")
    out.flush()
