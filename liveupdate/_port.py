"""The seam between the public API and whatever plays the kernel (private).

A *port* is the kernel as seen from user space, reduced to three calls:

``open_device(path) -> fd``
    open the device; the real one answers EBUSY to a second holder.
``ioctl(fd, cmd, arg: bytes) -> bytes``
    the semantics of :func:`fcntl.ioctl` with an immutable argument: the
    argument struct goes in, the struct as the kernel left it comes back,
    a failure raises :class:`OSError` with the kernel's errno. fds inside the
    structs are real fds of the calling process.
``close(fd)``
    release a device or session file.

The real device's port is the system calls themselves. The emulator and the
emulator service provide their own ports; neither side sees the other's
internals, only this contract. Backends make their session fds adoptable by
:meth:`liveupdate.Session.from_fd` through :func:`register_recognizer`.
"""
from __future__ import annotations

import errno
import fcntl
import os
__all__ = ["DevicePort", "DEVICE", "register_recognizer", "recognize", "fd_link"]

TYPE_CHECKING = False  # typing is for annotations only (see errors.py)
if TYPE_CHECKING:
    from typing import Callable, List, Optional, Protocol

    class Port(Protocol):
        """What the module doc says a port is, for type checkers."""

        kind: str

        def open_device(self, path: str) -> int: ...

        def ioctl(self, fd: int, cmd: int, arg: bytes) -> bytes: ...

        def close(self, fd: int) -> None: ...

    Recognizer = Callable[[int, str], Optional[Port]]
# At run time Port is no name at all: ports are duck-typed, and only type
# checkers (and the string annotations they read) see the Protocol.


class DevicePort:
    """The real ``/dev/liveupdate``: plain system calls, nothing in between."""

    kind = "device"
    # fcntl.ioctl itself, not a wrapper: the hot path pays for one C call.
    if TYPE_CHECKING:
        @staticmethod
        def ioctl(fd: int, cmd: int, arg: bytes) -> bytes: ...  # what fcntl.ioctl does with bytes
    else:
        ioctl = staticmethod(fcntl.ioctl)
    close = staticmethod(os.close)

    @staticmethod
    def open_device(path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def __repr__(self) -> str:
        return "<liveupdate port: kernel device>"


DEVICE = DevicePort()

#: What the kernel names a session's anonymous inode (see /proc/self/fd).
KERNEL_SESSION_LINK = "anon_inode:[luo_session]"

_recognizers: "List[Recognizer]" = []


def register_recognizer(fn: Recognizer) -> Recognizer:
    """Let a backend claim fds for :meth:`Session.from_fd`.

    ``fn(fd, link)`` gets the fd and its ``/proc/self/fd`` link text and
    returns the backend's port if the fd is one of its session handles."""
    if fn not in _recognizers:
        _recognizers.append(fn)
    return fn


def fd_link(fd: int) -> str:
    """The ``/proc/self/fd`` link of ``fd``; OSError(EBADF) if it is not open."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        raise OSError(errno.EBADF, f"fd {fd} is not open") from None


def _load_backends() -> None:
    # Backends register their recognizers when imported; import them only
    # when an fd is not the kernel's, so the device path never pays for them.
    for module in ("liveupdate.emulator", "liveupdate.service.client"):
        try:
            __import__(module)
        except ImportError:
            pass


def recognize(fd: int) -> Port:
    """The port that serves session fd ``fd``.

    Raises OSError: EBADF if ``fd`` is not open, ENOTTY if it is no session
    of any backend (what the kernel answers to a session ioctl on it)."""
    link = fd_link(fd)
    if link.startswith(KERNEL_SESSION_LINK):
        return DEVICE
    _load_backends()
    for fn in _recognizers:
        port = fn(fd, link)
        if port is not None:
            return port
    raise OSError(errno.ENOTTY, f"fd {fd} ({link}) is not a Live Update session")
