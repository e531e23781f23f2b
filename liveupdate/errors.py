"""The one place where an errno becomes an exception.

Every failure of this library is an :class:`OSError` that carries the
kernel's errno (``exc.errno``) and a message naming the operation and its
arguments. The classes also derive from the builtin :class:`OSError`
subclass Python uses for that errno, so ``except FileExistsError`` catches a
duplicate session name exactly as ``except OSError`` with ``errno.EEXIST``
does. Invalid arguments (EINVAL) are also a :class:`ValueError`.
"""
from __future__ import annotations

import errno as _errno
import os
# Typing names are for annotations only (strings, under the __future__
# import): importing typing would cost every program's start (it pulls in
# re, enum, functools ...), which a daemon's blackout after a kexec includes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Type

__all__ = [
    "LiveUpdateError",
    "InvalidArgumentError",
    "BusyError",
    "StaleHandleError",
    "KernelPanic",
    "EmulatorFallbackWarning",
    # one per builtin OSError subclass, for the errnos Python maps to one
    "PermissionLiveUpdateError",
    "FileNotFoundLiveUpdateError",
    "FileExistsLiveUpdateError",
    "ProcessLookupLiveUpdateError",
    "InterruptedLiveUpdateError",
    "ChildProcessLiveUpdateError",
    "BlockingIOLiveUpdateError",
    "NotADirectoryLiveUpdateError",
    "IsADirectoryLiveUpdateError",
    "BrokenPipeLiveUpdateError",
    "ConnectionAbortedLiveUpdateError",
    "ConnectionResetLiveUpdateError",
    "ConnectionRefusedLiveUpdateError",
    "TimeoutLiveUpdateError",
    "error_class",
    "make",
    "wrap",
    "wrap_ioctl",
]


class LiveUpdateError(OSError):
    """Base of every error this library raises for a failed operation.

    Attributes: ``errno`` (the kernel's), ``operation`` (e.g.
    ``"create_session"``), ``arguments`` (a dict of what was asked) and
    ``detail`` (a sentence on why, when more is known than the errno says).
    """

    operation: str = ""
    arguments: Dict[str, Any] = {}
    detail: Optional[str] = None


class InvalidArgumentError(LiveUpdateError, ValueError):
    """EINVAL: the kernel understood the request but an argument is wrong
    (or the session is in the wrong state for it)."""


class BusyError(LiveUpdateError):
    """EBUSY: the device is held by another process, or the file is already
    preserved in a session."""


class StaleHandleError(LiveUpdateError):
    """ESTALE: an emulated handle that belonged to a kernel replaced by an
    emulated kexec. A real kexec ends the process, so only emulators raise it."""


class KernelPanic(Exception):
    """An emulated kernel failed to boot from the preserved memory (where
    the real kernel would panic or disable live update at boot)."""


class EmulatorFallbackWarning(UserWarning):
    """``liveupdate.open()`` found no ``/dev/liveupdate`` and fell back to the
    in-process emulator, whose sessions do not survive a real kexec.

    Issued once per process (and logged at WARNING on the ``liveupdate``
    logger). A daemon that must never run on the emulator sets
    ``LIVEUPDATE_BACKEND=device`` (``open()`` then fails instead), or turns
    the warning into an error with
    ``warnings.simplefilter("error", liveupdate.EmulatorFallbackWarning)``
    (in pytest: ``-W error::liveupdate.EmulatorFallbackWarning``; Python's
    own ``-W`` cannot name it, as it runs before site-packages, where cffi
    lives, can be imported)."""


# The classes for errnos that Python maps to a builtin OSError subclass.
# Written out, not made on demand, so that each is importable under the name
# its traceback shows, which pickle (multiprocessing, concurrent.futures)
# needs to rebuild it in another process.


class PermissionLiveUpdateError(LiveUpdateError, PermissionError):
    """EPERM, EACCES."""


class FileNotFoundLiveUpdateError(LiveUpdateError, FileNotFoundError):
    """ENOENT."""


class FileExistsLiveUpdateError(LiveUpdateError, FileExistsError):
    """EEXIST."""


class ProcessLookupLiveUpdateError(LiveUpdateError, ProcessLookupError):
    """ESRCH."""


class InterruptedLiveUpdateError(LiveUpdateError, InterruptedError):
    """EINTR."""


class ChildProcessLiveUpdateError(LiveUpdateError, ChildProcessError):
    """ECHILD."""


class BlockingIOLiveUpdateError(LiveUpdateError, BlockingIOError):
    """EAGAIN, EALREADY, EINPROGRESS."""


class NotADirectoryLiveUpdateError(LiveUpdateError, NotADirectoryError):
    """ENOTDIR."""


class IsADirectoryLiveUpdateError(LiveUpdateError, IsADirectoryError):
    """EISDIR."""


class BrokenPipeLiveUpdateError(LiveUpdateError, BrokenPipeError):
    """EPIPE, ESHUTDOWN."""


class ConnectionAbortedLiveUpdateError(LiveUpdateError, ConnectionAbortedError):
    """ECONNABORTED."""


class ConnectionResetLiveUpdateError(LiveUpdateError, ConnectionResetError):
    """ECONNRESET."""


class ConnectionRefusedLiveUpdateError(LiveUpdateError, ConnectionRefusedError):
    """ECONNREFUSED."""


class TimeoutLiveUpdateError(LiveUpdateError, TimeoutError):
    """ETIMEDOUT."""


_BY_BUILTIN: Dict[type, Type[LiveUpdateError]] = {
    base: cls
    for cls in (
        PermissionLiveUpdateError, FileNotFoundLiveUpdateError, FileExistsLiveUpdateError,
        ProcessLookupLiveUpdateError, InterruptedLiveUpdateError, ChildProcessLiveUpdateError,
        BlockingIOLiveUpdateError, NotADirectoryLiveUpdateError, IsADirectoryLiveUpdateError,
        BrokenPipeLiveUpdateError, ConnectionAbortedLiveUpdateError, ConnectionResetLiveUpdateError,
        ConnectionRefusedLiveUpdateError, TimeoutLiveUpdateError,
    )
    for base in cls.__bases__[1:]
}

_SPECIAL: Dict[int, Type[LiveUpdateError]] = {
    _errno.EINVAL: InvalidArgumentError,
    _errno.EBUSY: BusyError,
    _errno.ESTALE: StaleHandleError,
}
_CACHE: Dict[int, Type[LiveUpdateError]] = dict(_SPECIAL)


def error_class(err: int) -> Type[LiveUpdateError]:
    """The exception class for an errno: :class:`LiveUpdateError` mixed with
    the builtin subclass Python picks for it (``FileExistsError`` for EEXIST,
    ``FileNotFoundError`` for ENOENT, ``PermissionError`` for EPERM ...)."""
    cls = _CACHE.get(err)
    if cls is None:
        builtin = type(OSError(err, ""))
        cls = LiveUpdateError if builtin is OSError else _BY_BUILTIN.get(builtin) or _new_class(builtin)
        _CACHE[err] = cls
    return cls


def _new_class(builtin: type) -> Type[LiveUpdateError]:
    # Only for a builtin subclass a future Python adds: made once and put in
    # this module, so that it, too, is found by the name it shows.
    name = builtin.__name__.replace("Error", "") + "LiveUpdateError"
    cls = type(name, (LiveUpdateError, builtin), {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    _BY_BUILTIN[builtin] = cls
    return cls


def _describe(op: str, args: Dict[str, Any]) -> str:
    shown = ", ".join(f"{key}={value!r}" for key, value in args.items())
    return f"{op}({shown})"


def make(err: int, op: str, detail: Optional[str] = None, **args: Any) -> LiveUpdateError:
    """Build the exception for ``op(**args)`` failing with ``err``.

    The message reads ``create_session(name='cache'): File exists (EEXIST)``,
    followed by ``detail`` when there is one."""
    code = _errno.errorcode.get(err, str(err))
    message = f"{_describe(op, args)}: {os.strerror(err)} ({code})"
    if detail:
        message += f": {detail}"
    exc = error_class(err)(err, message)
    exc.operation = op
    exc.arguments = dict(args)
    exc.detail = detail
    return exc


def wrap(exc: OSError, op: str, **args: Any) -> LiveUpdateError:
    """Turn a raw :class:`OSError` from a backend into the public exception,
    keeping its errno and any explanation the backend gave beyond the errno's
    own text."""
    if exc.errno is None:
        # Not an errno failure at all: keep it intact rather than invent one.
        raise exc
    detail = exc.strerror if exc.strerror and exc.strerror != os.strerror(exc.errno) else None
    if isinstance(exc, LiveUpdateError) and exc.detail:
        detail = exc.detail
    return make(exc.errno, op, detail, **args)


def wrap_ioctl(exc: OSError, op: str, command: Any, **args: Any) -> LiveUpdateError:
    """:func:`wrap` for a failed ioctl, whose row of the command table is
    ``command`` (or None). A kernel that lacks the command answers ENOTTY
    (a number it does not know exactly) or EINVAL (a number beyond its
    table); the first always means that, the second only for the commands
    whose row says EINVAL cannot mean anything else with the arguments this
    library sends (``unknown_if_einval``). Either way the error keeps the
    kernel's errno and says, once, which command this kernel does not
    support."""
    err = exc.errno
    if err is not None and command is not None and (err == _errno.ENOTTY or err == _errno.EINVAL and command.unknown_if_einval):
        return make(err, op, f"this kernel does not support {command.name} (ioctl {command.number:#x}); "
                             "it needs a newer Live Update kernel", **args)
    return wrap(exc, op, **args)
