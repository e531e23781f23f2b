"""What the systemd tier does in each boot, whoever plays systemd.

``run_stage`` is the same for the real systemd in the guest (stage.py,
with systemctl) and for the emulated manager on the host (emulated.py,
with liveupdate.emulator.systemd), so that the two runs can be compared
record by record. Boot 1 installs and starts the units one at a time,
restarts each once (a plain restart) and asks what will survive the kexec;
boot 2 waits for the units systemd started, restarts and asks again; boot 3
only looks. Each boot talks to the example daemon.
"""
from __future__ import annotations

from typing import Any, Dict, List

from scenarios import SERVICES

DAEMON_UNIT = "cache-daemon.service"
UNITS: List[str] = list(SERVICES) + [DAEMON_UNIT]
LAST_STAGE = 3


class System:
    """The operations a boot needs of its service manager."""

    errors: List[str]

    def install(self) -> Dict[str, Any]: ...
    def start(self, unit: str) -> None: ...
    def restart(self, unit: str) -> None: ...
    def wait_active(self) -> Dict[str, str]: ...
    def facts(self, unit: str) -> Dict[str, Any]: ...
    def check(self, unit: str) -> Dict[str, Any]: ...
    def check_text(self, units: List[str]) -> str: ...
    def daemon(self, *words: str) -> Dict[str, Any]: ...
    def say(self, text: str) -> None: ...


def talk_to_daemon(system: System, stage: int, label: str, observed: Dict[str, Any]) -> None:
    """What the example daemon serves now, then one more key for this boot."""
    seen: Dict[str, Any] = {key: system.daemon("get", key) for key in ("greeting", "boot1", "boot2", "boot3")}
    seen["stats"] = system.daemon("stats")
    if label == "after start":
        seen["set"] = system.daemon("set", "boot%d" % stage, "written in boot %d" % stage)
        if stage == 1:
            seen["set greeting"] = system.daemon("set", "greeting", "hello from the first kernel")
    observed.setdefault("daemon", {})[label] = seen


def run_stage(system: System, stage: int) -> Dict[str, Any]:
    observed: Dict[str, Any] = {"stage": stage}
    if stage == 1:
        system.say("installing %d units" % len(UNITS))
        observed["verify"] = system.install()
        for unit in UNITS:  # one at a time, in the order of their After=
            system.start(unit)
    system.say("waiting for the units")
    observed["active"] = system.wait_active()
    observed.setdefault("units", {})["after start"] = {u: system.facts(u) for u in UNITS}
    talk_to_daemon(system, stage, "after start", observed)
    if stage < LAST_STAGE:
        system.say("restarting each unit (a plain restart)")
        for unit in UNITS:
            system.restart(unit)
        observed["active after restart"] = system.wait_active()
        observed["units"]["after restart"] = {u: system.facts(u) for u in UNITS}
        talk_to_daemon(system, stage, "after restart", observed)
        system.say("asking what survives the kexec")
        observed["check"] = {"before kexec": {u: system.check(u) for u in UNITS}}
        # The words an operator reads, for the README.
        observed["check text"] = {"before kexec": system.check_text(["luo-drop.service", DAEMON_UNIT])}
    observed["errors"] = list(system.errors)
    return observed
