"""``/dev/liveupdate``, or an emulator behind the same API."""
from __future__ import annotations

import errno
import os
import _thread
import time
import warnings
# Typing names are for annotations only (strings, under the __future__
# import): importing typing would cost every program's start (it pulls in
# re, enum, functools ...), which a daemon's blackout after a kexec includes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional, Tuple

from . import _abi, _args, _port, _timeout, errors
from .session import Session, _Built

__all__ = ["open", "Device", "DEFAULT_PATH"]

DEFAULT_PATH = "/dev/liveupdate"
BACKENDS = ("auto", "device", "emulator", "service")
#: The environment variable that picks the backend for ``backend="auto"``.
BACKEND_ENV = "LIVEUPDATE_BACKEND"


def _logger() -> Any:
    """The ``liveupdate`` logger, made on first use: logging costs a daemon's
    start more than the rest of the package, and only the fallback needs it.
    A library's logger stays silent until the program configures logging:
    without the NullHandler, logging's last-resort handler would print the
    fallback message a second time, next to the warning."""
    import logging

    log = logging.getLogger("liveupdate")
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    return log


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


_NO_DEVICE = (
    "this kernel has no Live Update device: it needs Linux 7.x built with CONFIG_LIVEUPDATE "
    "and booted with liveupdate=on"
)
_NO_DEVICE_HINT = _NO_DEVICE + "; elsewhere use backend='emulator'"
_BUSY_HINT = "another process holds the device (the kernel allows one at a time); pass timeout=SECONDS to wait for it"
_ENV_DEVICE_HINT = _NO_DEVICE + f"; {BACKEND_ENV}=device forbids falling back to the emulator"
_FALLBACK_MESSAGE = (
    "no {path} on this kernel: liveupdate.open() uses the in-process emulator, whose sessions "
    "do not survive a real kexec; set " + BACKEND_ENV + "=device to fail instead, or pass "
    "backend='emulator' to choose it knowingly"
)


class Device:
    """An open ``/dev/liveupdate`` (or emulated one): the handle that creates
    sessions before a kexec and retrieves them after.

    The kernel lets one process hold the device at a time. Sessions live on
    after the device is closed; only their own fds keep them."""

    __slots__ = ("_port", "_ioctl", "_fd", "_path", "__weakref__")

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


def _open_error(exc: OSError, path: str, timeout: float, kind: str,
                no_device_hint: str = _NO_DEVICE_HINT) -> errors.LiveUpdateError:
    args: dict = {"path": path}
    if timeout:
        args["timeout"] = timeout
    if exc.errno == errno.EBUSY:
        hint = f"still held by another process after {timeout:g} s" if timeout else _BUSY_HINT
        return errors.make(errno.EBUSY, "open", hint, **args)
    if exc.errno == errno.ENOENT and path == DEFAULT_PATH and kind == "device":
        return errors.make(errno.ENOENT, "open", no_device_hint, **args)
    return errors.wrap(exc, "open", **args)


def _emulator_port() -> _port.Port:
    try:
        from . import emulator
    except ImportError as exc:  # pragma: no cover - the emulator ships with the package
        raise errors.make(errno.ENODEV, "open", f"the emulator cannot be loaded ({exc})") from None
    return emulator.default().port


_fallback_told = False
# _thread, not threading: the lock is all that is needed, and threading
# pulls in functools and collections at every start.
_fallback_lock = _thread.allocate_lock()


def _fallback_port(path: str) -> _port.Port:
    """The in-process emulator, for ``backend="auto"`` without a device: it
    says so once per process, since its sessions die with the process and a
    daemon relying on them would lose its state at the real kexec."""
    global _fallback_told
    port = _emulator_port()
    with _fallback_lock:
        if not _fallback_told:
            message = _FALLBACK_MESSAGE.format(path=path)
            _logger().warning("%s", message)
            # user code -> open() -> _choose_port() -> _choose_backend() -> here
            warnings.warn(message, errors.EmulatorFallbackWarning, stacklevel=5)
            # Only once the warning is through: under an "error" filter every
            # open() keeps failing instead of going quiet after the first.
            _fallback_told = True
    return port


def _service_port(address: str) -> _port.Port:
    from .service import client

    return client.port_for(address)


def _env_backend() -> str:
    chosen = os.environ.get(BACKEND_ENV, "").strip()
    if not chosen:
        return "auto"
    if chosen not in BACKENDS:
        raise errors.make(errno.EINVAL, "open", f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}",
                          **{BACKEND_ENV: chosen})
    return chosen


def _choose_port(path: str, backend: str, emulator: Optional[str]) -> Tuple[_port.Port, str]:
    """The port ``open()`` uses, and the hint for a missing device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        backend = _env_backend()
        if backend == "device":
            if emulator:
                raise errors.make(errno.EINVAL, "open", f"{BACKEND_ENV}=device refuses the emulator service "
                                  "given by emulator=", emulator=emulator)
            return _port.DEVICE, _ENV_DEVICE_HINT
    return _choose_backend(path, backend, emulator), _NO_DEVICE_HINT


def _choose_backend(path: str, backend: str, emulator: Optional[str]) -> _port.Port:
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
    return _fallback_port(path)


def open(path: str = DEFAULT_PATH, *, backend: str = "auto", timeout: float = 0,
         emulator: Optional[str] = None) -> Device:
    """Open the Live Update device.

    ``backend``: ``"device"`` (the kernel's ``path``), ``"emulator"`` (the
    process-wide in-process emulator, or the emulator service at
    ``emulator=SOCKET``), ``"service"`` (the service named by ``emulator`` or
    ``$LIVEUPDATE_EMULATOR``) or ``"auto"``.

    ``"auto"`` takes the choice from ``$LIVEUPDATE_BACKEND`` (one of the
    four names) when it is set, else: an explicit ``emulator=`` first, then
    the device when ``path`` exists, then the service named by
    ``$LIVEUPDATE_EMULATOR``, and last the in-process emulator. That last
    fallback warns, once per process, with
    :class:`liveupdate.EmulatorFallbackWarning` and a WARNING on the
    ``liveupdate`` logger: its sessions end with the process, so nothing
    survives a real kexec. A daemon that must keep state across one runs with
    ``LIVEUPDATE_BACKEND=device``: ``open()`` then fails (ENOENT) where there
    is no device instead of falling back.

    ``timeout``: seconds to keep trying while another process holds the
    device (EBUSY), then fail.

    Raises OSError: EBUSY (held elsewhere), ENOENT (no such device), EACCES,
    EINVAL (``$LIVEUPDATE_BACKEND`` is not a backend's name, or is
    ``device`` while ``emulator=`` names a service)."""
    port, no_device_hint = _choose_port(path, backend, emulator)
    return Device._open_port(port, path, timeout, no_device_hint)
