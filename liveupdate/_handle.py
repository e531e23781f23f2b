"""What a Device and a Session share: an fd of some port, and its plumbing
(private).

Both are an fd served by a port (:mod:`._port`): ``fileno()``, ``close()``
(idempotent), the context manager, the ResourceWarning of an unclosed one,
and the slow path of a failed ioctl, which retries EINTR and turns the
rest into the library's exception (:mod:`.errors`). The hot paths (create
a session, preserve, retrieve) call the port themselves and come here only
when the call failed.
"""
from __future__ import annotations

import errno
import warnings

TYPE_CHECKING = False  # typing is for annotations only (see device.py)
if TYPE_CHECKING:
    from typing import Any, Dict, TypeVar

    from . import _port

    _H = TypeVar("_H", bound="Handle")

from . import _abi, errors

__all__ = ["Handle"]


class Handle:
    """An fd of a port. Subclasses say what they are (``_kind``) and which
    arguments name them in an error message."""

    __slots__ = ("_port", "_fd", "__weakref__")
    _port: "_port.Port"
    _fd: int
    #: "device" or "session", for messages
    _kind = "handle"

    def _op_args(self) -> "Dict[str, Any]":
        """What names this handle in the message of a failed ioctl."""
        return {}

    def _close_args(self) -> "Dict[str, Any]":
        """What names this handle in the message of a failed close."""
        return self._op_args()

    def _call(self, cmd: int, arg: bytes, op: str, **args: Any) -> bytes:
        try:
            return self._port.ioctl(self._fd, cmd, arg)
        except (OSError, ValueError) as exc:
            return self._retry(exc, cmd, arg, op, **args)

    def _retry(self, exc: Exception, cmd: int, arg: bytes, op: str, **args: Any) -> bytes:
        # The slow path of a failed call: EINTR is retried, the rest wrapped.
        # A closed handle shows up as fcntl's ValueError for fd -1, on the
        # first call or on a retry (another thread closed it in between):
        # both are EBADF with the same message, so the retry catches
        # ValueError too. A ValueError on an open handle is not ours to
        # translate (a port refusing an argument): it goes up unchanged.
        while True:
            if self._fd < 0:
                raise errors.make(errno.EBADF, op, f"the {self._kind} is closed", **self._op_args(),
                                  **args) from None
            if not isinstance(exc, OSError):
                raise exc
            if exc.errno != errno.EINTR:
                raise errors.wrap_ioctl(exc, op, _abi.BY_NUMBER.get(cmd), **self._op_args(), **args) from None
            try:
                return self._port.ioctl(self._fd, cmd, arg)
            except (OSError, ValueError) as again:
                exc = again

    @property
    def backend(self) -> str:
        """Which kernel serves this handle: "device", "emulator" or "service"."""
        return self._port.kind

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd. Raises ValueError once closed, as files do."""
        if self._fd < 0:
            raise ValueError(f"I/O operation on a closed {self._kind}")
        return self._fd

    def close(self) -> None:
        """Close the fd; a no-op when already closed."""
        fd = self._fd
        if fd < 0:
            return
        self._fd = -1
        try:
            self._port.close(fd)
        except OSError as exc:
            raise errors.wrap(exc, "close", **self._close_args(), fd=fd) from None

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            # No stacklevel: the garbage collector calls this, no caller is to blame.
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)  # noqa: B028
            try:
                self.close()
            except OSError:
                pass
