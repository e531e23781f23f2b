"""``/dev/liveupdate``, or an emulator behind the same API."""
from __future__ import annotations

import errno
import time
# Typing names are for annotations only (strings, under the __future__
# import): importing typing would cost every program's start (it pulls in
# re, enum, functools ...), which a daemon's blackout after a kexec includes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional

from . import _abi, _args, _port, _timeout, errors
from ._handle import Handle
from .session import Session, _Built

__all__ = ["Device", "DEFAULT_PATH"]

DEFAULT_PATH = "/dev/liveupdate"
#: The environment variable that picks the backend for ``backend="auto"``
#: (read by liveupdate._backends; named here for the hints below).
BACKEND_ENV = "LIVEUPDATE_BACKEND"


_CREATE = _abi.IOCTL_CREATE_SESSION
_RETRIEVE = _abi.IOCTL_RETRIEVE_SESSION
_pack_session = _abi.CREATE_SESSION.pack
_unpack_session = _abi.CREATE_SESSION.unpack
_SESSION_ARG_SIZE = _abi.CREATE_SESSION.size
_NAME_MAX = _abi.NAME_MAX


def _fast_name(name: object) -> Optional[bytes]:
    """The common case of a valid name, checked cheaply; None sends the
    caller to _args.name(), which explains what is wrong."""
    if type(name) is str:
        try:
            raw = name.encode()
        except UnicodeEncodeError:
            return None
    elif type(name) is bytes:
        raw = name
    else:
        return None
    if 0 < len(raw) <= _abi.NAME_MAX and b"\0" not in raw:
        return raw
    return None


_NO_DEVICE = (
    "this kernel has no Live Update device: it needs Linux 7.x built with CONFIG_LIVEUPDATE "
    "and booted with liveupdate=on"
)
_NO_DEVICE_HINT = _NO_DEVICE + "; elsewhere use backend='emulator'"
_BUSY_HINT = "another process holds the device (the kernel allows one at a time); pass timeout=SECONDS to wait for it"
_ENV_DEVICE_HINT = _NO_DEVICE + f"; {BACKEND_ENV}=device forbids falling back to the emulator"


class Device(Handle):
    """An open ``/dev/liveupdate`` (or emulated one): the handle that creates
    sessions before a kexec and retrieves them after.

    The kernel lets one process hold the device at a time. Sessions live on
    after the device is closed; only their own fds keep them."""

    __slots__ = ("_ioctl", "_path")
    _ioctl: "Callable[[int, int, bytes], bytes]"  # the port's, looked up once: the hot path's call
    _path: str
    _kind = "device"

    def __init__(self) -> None:
        raise TypeError("use liveupdate.open() to open the device")

    @classmethod
    def _open_port(cls, port: _port.Port, path: str = DEFAULT_PATH, timeout: float = 0,
                   no_device_hint: str = _NO_DEVICE_HINT) -> "Device":
        """Open the device of any port, retrying EBUSY for ``timeout`` seconds."""
        deadline = time.monotonic() + _timeout.seconds(timeout, "open", path=path)  # EINVAL: NaN, < 0
        delay = 0.005
        while True:
            try:
                fd = port.open_device(path)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                remaining = deadline - time.monotonic()
                if exc.errno == errno.EBUSY and remaining > 0:
                    time.sleep(min(delay, remaining))
                    delay = min(delay * 2, 0.1)
                    continue
                raise _open_error(exc, path, timeout, port.kind, no_device_hint) from None
        self = object.__new__(cls)
        self._port = port
        self._ioctl = port.ioctl
        self._fd = fd
        self._path = path
        return self

    def create_session(self, name: _args.Name) -> Session:
        """Create an outgoing session named ``name`` (str or bytes, 1 to 63
        bytes once UTF-8 encoded, no NUL). Preserve files in it and keep it
        open until the kexec.

        Raises OSError: EEXIST (an outgoing session of that name exists;
        incoming sessions do not count), EINVAL (bad name), EMFILE (no fd
        left), ENOMEM, ENOSPC (the kernel's session block cap).
        """
        # Inlined fast path for the usual ASCII str name (a session per VM
        # or per cache shard adds up); anything else gets the full check.
        if type(name) is str and name.isascii() and 0 < len(name) <= _NAME_MAX and "\0" not in name:
            raw = name.encode()
        else:
            raw = _args.name(name, "create_session")
        arg = _pack_session(_SESSION_ARG_SIZE, -1, raw)
        try:
            out = self._ioctl(self._fd, _CREATE, arg)
        except (OSError, ValueError) as exc:
            out = self._retry(exc, _CREATE, arg, "create_session", name=name)
        # Session._adopt() written out: a call frame fewer on the hot path.
        session = _Built()
        session._port = self._port
        session._fd = _unpack_session(out)[1]
        session._name = raw
        session._state = "outgoing"
        return session

    def retrieve_session(self, name: _args.Name) -> Session:
        """Take back the session ``name`` that the previous kernel handed over.
        Retrieve its files with :meth:`Session.retrieve`, then :meth:`Session.finish`.

        Raises OSError: ENOENT (no such incoming session), EINVAL (bad name,
        or already retrieved), EMFILE (no fd left)."""
        raw = _fast_name(name)
        if raw is None:
            raw = _args.name(name, "retrieve_session")
        arg = _pack_session(_SESSION_ARG_SIZE, -1, raw)
        try:
            out = self._ioctl(self._fd, _RETRIEVE, arg)
        except (OSError, ValueError) as exc:
            out = self._retry(exc, _RETRIEVE, arg, "retrieve_session", name=name)
        return Session._adopt(self._port, _unpack_session(out)[1], "incoming", raw)

    def _close_args(self) -> "Dict[str, Any]":
        return {"path": self._path}

    @property
    def path(self) -> str:
        return self._path

    def close(self) -> None:
        """Let go of the device so another process may open it; a no-op when
        already closed. Sessions stay alive through their own fds."""
        Handle.close(self)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<liveupdate.Device {self._path!r} {state} backend={self._port.kind}>"


def _open_error(exc: OSError, path: str, timeout: float, kind: str,
                no_device_hint: str = _NO_DEVICE_HINT) -> errors.LiveUpdateError:
    args: "Dict[str, Any]" = {"path": path}
    if timeout:
        args["timeout"] = timeout
    if exc.errno == errno.EBUSY:
        hint = f"still held by another process after {timeout:g} s" if timeout else _BUSY_HINT
        return errors.make(errno.EBUSY, "open", hint, **args)
    if exc.errno == errno.ENOENT and path == DEFAULT_PATH and kind == "device":
        return errors.make(errno.ENOENT, "open", no_device_hint, **args)
    return errors.wrap(exc, "open", **args)
