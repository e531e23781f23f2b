"""``liveupdate_systemd``: a systemd-managed daemon's live update, tested on
any machine (no LUO kernel, no systemd 262 needed).

A test asks for the fixture, loads its unit (the unit file's text or path,
and the command that runs the daemon), and is written as the two stages of
a kexec, as with ``liveupdate_kexec``::

    def test_my_daemon_keeps_its_cache(liveupdate_systemd):
        sd = liveupdate_systemd
        sd.unit("deploy/my-daemon.service", command=[sys.executable, "my_daemon.py"])
        if sd.stage == 1:
            sd.start("my-daemon.service")
            ...                                   # fill the daemon's cache
            sd.kexec()                            # systemctl kexec, emulated
        assert sd.fd_store("my-daemon.service")  # stage 2: what systemd passed back
        ...                                       # ask the daemon, restarted by "systemd"

``sd.kexec()`` does what systemd 262 does at ``systemctl kexec`` (see
:mod:`liveupdate.emulator.systemd.manager`): it stops the services, carries
their fd stores through an emulated kexec, starts the enabled units (those
with ``WantedBy=multi-user.target``) with their fds and returns with
``sd.stage`` one higher. Between the stages only what systemd carried and
``sd.state`` (JSON-able, checked at the kexec) remain.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ...errors import make
from .manager import EmulatedSystemd

__all__ = ["SystemdHarness", "with_command"]


class SystemdHarness:
    """The fixture's value: an emulated service manager for one test."""

    def __init__(self, directory: str, env: Optional[Dict[str, str]] = None) -> None:
        from .. import Emulator

        #: The emulated kernel; look at it (``walk()``) only while no service runs.
        self.emulator = Emulator()
        self.manager = EmulatedSystemd(emulator=self.emulator, directory=directory, env=env)
        self.stage = 1
        #: JSON-able values handed from one stage to the next.
        self.state: Dict[str, Any] = {}
        self.kexecs: List[Dict[str, Any]] = []

    def unit(self, unit: Union[str, "os.PathLike[str]"], *, name: Optional[str] = None,
             command: Optional[Sequence[str]] = None) -> str:
        """Load a unit: ``unit`` is its file's path or its text (then give
        ``name``). ``command`` (argv) replaces the unit's ExecStart=, for
        a unit file whose command only exists once deployed. Returns the
        unit's name. Keys the emulated manager does not play are refused
        (OSError EINVAL, with the file and line)."""
        text = os.fspath(unit)
        if "\n" not in text and "[" not in text:
            name = name or os.path.basename(text)
            with open(text, encoding="utf-8") as f:
                text = f.read()
        if name is None:
            raise make(errno.EINVAL, "liveupdate_systemd.unit", "a unit given as text needs name=")
        if command is not None:
            text = with_command(text, list(command))
        return self.manager.load(text, name=name).name

    def start(self, name: str) -> None:
        self.manager.start(name)

    def stop(self, name: str) -> None:
        self.manager.stop(name)

    def restart(self, name: str) -> None:
        """A plain restart: the fd store stays."""
        self.manager.restart(name)

    def kexec(self) -> Dict[str, Any]:
        """``systemctl kexec``, emulated; returns its report (``mapping``,
        ``lost``, ``kexecs``) and moves to the next stage.

        Raises OSError EINVAL when ``state`` holds what JSON cannot carry."""
        try:
            self.state = json.loads(json.dumps(self.state))
        except (TypeError, ValueError) as exc:
            raise make(errno.EINVAL, "liveupdate_systemd.kexec", f"state must survive JSON, as it would across a real "
                                                      f"kexec: {exc}") from None
        report = self.manager.kexec()
        self.kexecs.append(report)
        self.stage += 1
        return report

    def fd_store(self, name: str) -> List[Tuple[str, str]]:
        """(name, what) of each entry of the unit's fd store, newest first."""
        return self.manager.fd_store(name)

    def check(self, name: str) -> Any:
        """What the next kexec keeps of the unit's fd store (as ``liveupdate check``)."""
        return self.manager.check(name)

    def log(self, name: str) -> str:
        """What the unit's processes wrote (stdout and stderr)."""
        return self.manager.log(name)

    @property
    def env(self) -> Dict[str, str]:
        """The environment the services start from (change it before a start)."""
        return self.manager.env

    def close(self) -> None:
        self.manager.close()


def with_command(text: str, argv: List[str]) -> str:
    """The unit text with its ExecStart= replaced by ``argv``."""
    command = "ExecStart=" + " ".join(shlex.quote(a) for a in argv)
    lines, done, in_service = [], False, False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            if in_service and not done:
                lines.append(command)
                done = True
            in_service = stripped == "[Service]"
        if in_service and stripped.split("=", 1)[0].strip() == "ExecStart":
            if not done:
                lines.append(command)
                done = True
            continue
        lines.append(line)
    if not done:
        if not in_service:
            lines.append("[Service]")
        lines.append(command)
    return "\n".join(lines) + "\n"
