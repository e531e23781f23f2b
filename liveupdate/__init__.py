"""Linux Live Update (``/dev/liveupdate``) from Python.

Keep memfds alive across a kexec into a new kernel: open the device, create a
named session, preserve file descriptors in it under 64-bit tokens and keep
the session open; after the kexec, retrieve the session and its files, then
finish it. Where the kernel has no device, the same API runs on an emulator.

    import liveupdate
    with liveupdate.open() as dev:
        session = dev.create_session("cache")
        session.preserve(memfd, token=1)
"""
from __future__ import annotations

from . import errors
from ._backends import open
from .device import DEFAULT_PATH, Device
from .errors import (BusyError, EmulatorFallbackWarning, InvalidArgumentError, KernelPanic, LiveUpdateError,
                     StaleHandleError)
from .session import Session

__all__ = [
    "open",
    "Device",
    "Session",
    "Emulator",
    "DEFAULT_PATH",
    "errors",
    "LiveUpdateError",
    "InvalidArgumentError",
    "BusyError",
    "StaleHandleError",
    "KernelPanic",
    "EmulatorFallbackWarning",
]
__version__ = "0.1.0"


TYPE_CHECKING = False  # typing is for annotations only (see device.py)
if TYPE_CHECKING:
    from .emulator import Emulator


def __getattr__(name: str) -> type:
    # The emulator loads on first use so that programs on a real kernel
    # never import it.
    if name == "Emulator":
        from .emulator import Emulator

        return Emulator
    raise AttributeError(f"module 'liveupdate' has no attribute {name!r}")
