"""The emulator service: one emulated kernel shared by many processes.

A daemon keeps its session fd in one process, another process triggers the
kexec, a new process retrieves afterwards: an emulator inside one process
cannot model that, a service can. Run one with ``liveupdate emulator serve
[--socket PATH] [--image PATH]`` (or ``python -m liveupdate.service serve``)
and point clients at it with ``liveupdate.open(emulator=PATH)`` or
``LIVEUPDATE_EMULATOR=PATH``; ``liveupdate emulator kexec`` reboots it.

Modules: :mod:`.protocol` (the wire format), :mod:`.server` (the event
loop and its connections), :mod:`.connection` (one connection),
:mod:`.relay` and :mod:`.requests` (what each request does),
:mod:`.budget` (what each client may make the service hold),
:mod:`.scheduler` and :mod:`.worker` (long kernel calls off the loop),
:mod:`.client` (the port clients use), :mod:`.kernel` and :mod:`.image`
(the emulated kernel and its image on disk), :mod:`.paths` (the socket),
:mod:`.commands` (the command line), :mod:`.testing` (a service for tests).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["port_for", "kexec", "status"]


def port_for(path: str) -> Any:
    """The port of the service at ``path``; see :func:`.client.port_for`."""
    from .client import port_for as _port_for

    return _port_for(path)


def kexec(path: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run an emulated kexec in the service at ``path``; see :func:`.client.kexec`."""
    from .client import kexec as _kexec

    return _kexec(path, timeout)


def status(path: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """What the service at ``path`` holds; see :func:`.client.status`."""
    from .client import status as _status

    return _status(path, timeout)
