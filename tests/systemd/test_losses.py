"""What systemd and the kernel cannot carry, said before the kexec by
``liveupdate check`` and compared with what really came back.

luo-drop.service stores, next to memfds, fds no Live Update handler takes
(a socket, a pipe, an eventfd, a directory, files on a disk and on tmpfs),
a memfd that is also preserved in a session of its own (systemd's preserve
of it fails with EBUSY), a memfd stored without FDNAME, and that session.
Every unit is checked before each kexec; the check must name exactly what
the service finds after it."""
from __future__ import annotations

import errno
import os
from collections import Counter
from typing import Any, Dict, List

import pytest

from .conftest import Tier, found_names, units

# What systemd 262.1 and Linux 7.3 did with luo-drop.service's fd store.
SURVIVES = {"memfd", "write-sealed", "unlinked", "stored", "dropsess"}
LOST = {"socket", "pipe", "eventfd", "directory", "regular", "tmpfs", "inboth"}


def predicted(check: Dict[str, Any]) -> Dict[str, List[bool]]:
    out: Dict[str, List[bool]] = {}
    for entry in check.get("entries", []):
        out.setdefault(entry["name"], []).append(entry["survives"])
    return out


def survivors(check: Dict[str, Any]) -> Counter:
    return Counter(e["name"] for e in check.get("entries", []) if e["survives"] is True)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("unit", [u for u in units() if u != "cache-daemon.service"])
def test_check_names_exactly_what_survives(guest_ok: Tier, unit: str, stage: int) -> None:
    check = guest_ok.check(stage, unit)
    assert "entries" in check, check
    assert all(e["survives"] is not None for e in check["entries"]), check
    after = guest_ok.starts_in(unit, stage + 1)[0]
    # The service itself adds nothing before it reports, so what it found is
    # what systemd brought through the kexec, but for the fresh session
    # systemd hands a LUOSession= unit at each start when none came through:
    # whatever the kernel handed over is incoming, so that one is outgoing.
    came_back = Counter(f["name"] for f in after["found"] if f.get("state") != "outgoing")
    assert came_back == survivors(check), (unit, stage, check, found_names(after))


def test_what_cannot_be_carried(guest_ok: Tier) -> None:
    check = guest_ok.check(1, "luo-drop.service")
    verdicts = predicted(check)
    assert {name for name, v in verdicts.items() if v == [True]} == SURVIVES
    assert {name for name, v in verdicts.items() if v == [False]} == LOST
    why = {e["name"]: e for e in check["entries"]}
    assert why["inboth"]["errno"] == "EBUSY"
    for name in ("socket", "pipe", "eventfd", "directory", "regular", "tmpfs"):
        assert why[name]["errno"] == "ENOENT", why[name]
    assert why["dropsess"]["kind"] == "session" and why["dropsess"]["state"] == "outgoing"
    # Each of those was asked of the kernel, not judged by rule.
    assert all(e["probed"] for e in check["entries"] if e["kind"] != "session")


def test_an_incoming_session_is_named_as_lost_before_the_second_kexec(guest_ok: Tier) -> None:
    for unit in ("luo-own-keep.service", "luo-drop.service"):
        check = guest_ok.check(2, unit)
        sessions = [e for e in check["entries"] if e["kind"] == "session"]
        assert sessions and all(e["state"] == "incoming" and e["survives"] is False for e in sessions), check
    # The carried ones are outgoing again, and named as surviving.
    for unit in ("luo-own.service", "luo-libd.service"):
        sessions = [e for e in guest_ok.check(2, unit)["entries"] if e["kind"] == "session"]
        assert sessions and all(e["state"] == "outgoing" and e["survives"] is True for e in sessions)


def test_the_example_daemon_keeps_its_data_through_both_kexecs(guest_ok: Tier) -> None:
    seen = {stage: guest_ok.stages[stage]["daemon"] for stage in (1, 2, 3)}
    assert seen[1]["after start"]["set greeting"]["rc"] == 0, seen[1]
    assert seen[1]["after restart"]["greeting"]["out"] == "hello from the first kernel", seen[1]
    for stage in (2, 3):
        now = seen[stage]["after start"]
        assert now["greeting"]["out"] == "hello from the first kernel", (stage, now)
        assert now["boot1"]["out"] == "written in boot 1", (stage, now)
        assert '"origin": "systemd\'s fd store"' in now["stats"]["out"], (stage, now)
    assert seen[3]["after start"]["boot2"]["out"] == "written in boot 2"
    check = guest_ok.check(2, "cache-daemon.service")
    assert [(e["name"], e["survives"]) for e in check["entries"]] == [("cache-daemon-data", True)]


def test_systemd_shutdown_logs_each_loss_the_check_named(guest_ok: Tier) -> None:
    logged = guest_ok.shutdown_warnings()
    check = guest_ok.check(1, "luo-drop.service")
    for entry in check["entries"]:
        if entry["kind"] == "session" or entry["survives"]:
            continue
        expected = os.strerror(getattr(errno, entry["errno"]))
        assert (entry["name"], expected) in logged, (entry, logged)
