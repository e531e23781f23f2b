"""systemd's Live Update layer, emulated: an emulated service manager that
runs real service processes from real unit files and does, at an emulated
kexec, what systemd 262 does at ``systemctl kexec``.

One module per part of systemd that takes part: :mod:`.unit_file`
(reading a unit, load-fragment.c), :mod:`.fdstore` (a service's fd store),
:mod:`.notify` (the notify socket), :mod:`.service` (starting a service,
``LUOSession=``), :mod:`.luo` (src/core/luo.c and src/shared/luo-util.c:
the ``systemd`` session), :mod:`.manager` (the whole), :mod:`.fixture`
(what the ``liveupdate_systemd`` fixture of :mod:`liveupdate.testing` gives a test).
"""
from __future__ import annotations

from .fixture import SystemdHarness
from .manager import EmulatedSystemd
from .service import luo_session_kernel_name
from .unit_file import Unit, load_unit, parse_unit

__all__ = ["EmulatedSystemd", "SystemdHarness", "Unit", "load_unit", "parse_unit", "luo_session_kernel_name"]
