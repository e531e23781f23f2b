"""Which kernel ``liveupdate.open()`` talks to: the backend choice, in one
place beside the port seam (private).

A *backend* is a port (:mod:`._port`) and where it comes from: the real
device (:data:`._port.DEVICE`), the in-process emulator
(:mod:`liveupdate.emulator`) or the emulator service
(:mod:`liveupdate.service.client`). This module alone knows all three; the
handles (:mod:`.device`, :mod:`.session`) know only the port they were
given, and the backends know nothing of each other. The emulator and the
service load on first use, so a program on a real kernel imports neither.

A new backend is a port class (see ``liveupdate/emulator/port.py``), a
name in :data:`BACKENDS` and a branch in :func:`_choose_backend`.
"""
from __future__ import annotations

import errno
import os
import _thread
import warnings

TYPE_CHECKING = False  # typing is for annotations only (see device.py)
if TYPE_CHECKING:
    from typing import Any, Literal, Optional, Tuple

    #: The names ``backend=`` takes.
    Backend = Literal["auto", "device", "emulator", "service"]

from . import _port, errors
from .device import _ENV_DEVICE_HINT, _NO_DEVICE_HINT, BACKEND_ENV, DEFAULT_PATH, Device

__all__ = ["open", "BACKENDS", "BACKEND_ENV"]

#: The names ``backend=`` takes (the Backend Literal's values).
BACKENDS = ("auto", "device", "emulator", "service")


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



_FALLBACK_MESSAGE = (
    "no {path} on this kernel: liveupdate.open() uses the in-process emulator, whose sessions "
    "do not survive a real kexec; set " + BACKEND_ENV + "=device to fail instead, or pass "
    "backend='emulator' to choose it knowingly"
)


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


def _env_backend() -> "Backend":
    chosen = os.environ.get(BACKEND_ENV, "").strip()
    if not chosen:
        return "auto"
    if chosen not in BACKENDS:
        raise errors.make(errno.EINVAL, "open", f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}",
                          **{BACKEND_ENV: chosen})
    return chosen  # type: ignore[return-value]  # checked against BACKENDS above


def _choose_port(path: str, backend: "Backend", emulator: Optional[str]) -> Tuple[_port.Port, str]:
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


def _choose_backend(path: str, backend: "Backend", emulator: Optional[str]) -> _port.Port:
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


def open(path: str = DEFAULT_PATH, *, backend: "Backend" = "auto", timeout: float = 0,
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
