"""``/dev/liveupdate``, or an emulator behind the same API."""
from __future__ import annotations

import errno
import os
import time
import warnings
from typing import Any, Optional

from . import _abi, _args, _port, errors
from .session import Session, _Built

__all__ = ["open", "Device", "DEFAULT_PATH"]

DEFAULT_PATH = "/dev/liveupdate"
BACKENDS = ("auto", "device", "emulator", "service")

_CREATE = _abi.IOCTL_CREATE_SESSION
_RETRIEVE = _abi.IOCTL_RETRIEVE_SESSION
_pack_session = _abi.CREATE_SESSION.pack
_unpack_session = _abi.CREATE_SESSION.unpack
_SESSION_ARG_SIZE = _abi.CREATE_SESSION.size
_NAME_MAX = _abi.NAME_MAX


def _fast_name(name: Any) -> Optional[bytes]:
    """The common case of a valid name, checked cheaply; None sends the
    caller to _args.name(), which explains what is wrong."""
    if type(name) is str:
        try:
            name = name.encode()
        except UnicodeEncodeError:
            return None
    elif type(name) is not bytes:
        return None
    if 0 < len(name) <= _abi.NAME_MAX and b"\0" not in name:
        return name
    return None


_NO_DEVICE_HINT = (
    "this kernel has no Live Update device: it needs Linux 7.x built with CONFIG_LIVEUPDATE "
    "and booted with liveupdate=on; elsewhere use backend='emulator'"
)
_BUSY_HINT = "another process holds the device (the kernel allows one at a time); pass timeout=SECONDS to wait for it"


class Device:
    """An open ``/dev/liveupdate`` (or emulated one): the handle that creates
    sessions before a kexec and retrieves them after.

    The kernel lets one process hold the device at a time. Sessions live on
    after the device is closed; only their own fds keep them."""

    __slots__ = ("_port", "_ioctl", "_fd", "_path", "__weakref__")

    def __init__(self) -> None:
        raise TypeError("use liveupdate.open() to open the device")

    @classmethod
    def _open_port(cls, port: _port.Port, path: str = DEFAULT_PATH, timeout: float = 0) -> "Device":
        """Open the device of any port, retrying EBUSY for ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
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
                raise _open_error(exc, path, timeout, port.kind) from None
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

    def _retry(self, exc: Exception, cmd: int, arg: bytes, op: str, **args: Any) -> bytes:
        # The slow path of a failed call: EINTR is retried, a closed device
        # (fcntl refuses fd -1 with ValueError) is EBADF, the rest is wrapped.
        while True:
            if self._fd < 0:
                raise errors.make(errno.EBADF, op, "the device is closed", **args) from None
            if not isinstance(exc, OSError):
                raise exc
            if exc.errno != errno.EINTR:
                raise errors.wrap(exc, op, **args) from None
            try:
                return self._ioctl(self._fd, cmd, arg)
            except (OSError, ValueError) as again:
                exc = again

    @property
    def backend(self) -> str:
        """Which kernel this is: "device", "emulator" or "service"."""
        return self._port.kind

    @property
    def path(self) -> str:
        return self._path

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The device fd. Raises ValueError once closed, as files do."""
        if self._fd < 0:
            raise ValueError("I/O operation on a closed device")
        return self._fd

    def close(self) -> None:
        """Let go of the device so another process may open it; a no-op when
        already closed. Sessions stay alive through their own fds."""
        fd = self._fd
        if fd < 0:
            return
        self._fd = -1
        try:
            self._port.close(fd)
        except OSError as exc:
            raise errors.wrap(exc, "close", path=self._path, fd=fd) from None

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<liveupdate.Device {self._path!r} {state} backend={self._port.kind}>"

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            try:
                self.close()
            except OSError:
                pass


def _open_error(exc: OSError, path: str, timeout: float, kind: str) -> errors.LiveUpdateError:
    args: dict = {"path": path}
    if timeout:
        args["timeout"] = timeout
    if exc.errno == errno.EBUSY:
        hint = f"still held by another process after {timeout:g} s" if timeout else _BUSY_HINT
        return errors.make(errno.EBUSY, "open", hint, **args)
    if exc.errno == errno.ENOENT and path == DEFAULT_PATH and kind == "device":
        return errors.make(errno.ENOENT, "open", _NO_DEVICE_HINT, **args)
    return errors.wrap(exc, "open", **args)


def _emulator_port() -> _port.Port:
    try:
        from . import emulator
    except ImportError as exc:  # pragma: no cover - the emulator ships with the package
        raise errors.make(errno.ENODEV, "open", f"the emulator cannot be loaded ({exc})") from None
    return emulator.default().port


def _service_port(address: str) -> _port.Port:
    from .service import client

    return client.port_for(address)


def _choose_port(path: str, backend: str, emulator: Optional[str]) -> _port.Port:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    service = emulator or os.environ.get("LIVEUPDATE_EMULATOR") or None
    if backend == "device":
        return _port.DEVICE
    if backend == "service" or (backend == "emulator" and emulator):
        if not service:
            raise errors.make(errno.EINVAL, "open", "backend='service' needs emulator=SOCKET or LIVEUPDATE_EMULATOR",
                              backend=backend)
        return _service_port(service)
    if backend == "emulator":
        return _emulator_port()
    # auto: the real device wins wherever it exists
    if emulator:
        return _service_port(emulator)
    if os.path.exists(path):
        return _port.DEVICE
    if service:
        return _service_port(service)
    return _emulator_port()


def open(path: str = DEFAULT_PATH, *, backend: str = "auto", timeout: float = 0,
         emulator: Optional[str] = None) -> Device:
    """Open the Live Update device.

    ``backend``: ``"device"`` (the kernel's ``path``), ``"emulator"`` (the
    process-wide in-process emulator, or the emulator service at
    ``emulator=SOCKET``), ``"service"`` (the service named by ``emulator`` or
    ``$LIVEUPDATE_EMULATOR``) or ``"auto"``: an explicit ``emulator=`` first,
    else the device when ``path`` exists, else the service named by
    ``$LIVEUPDATE_EMULATOR``, else the in-process emulator.

    ``timeout``: seconds to keep trying while another process holds the
    device (EBUSY), then fail.

    Raises OSError: EBUSY (held elsewhere), ENOENT (no such device), EACCES."""
    return Device._open_port(_choose_port(path, backend, emulator), path, timeout)
