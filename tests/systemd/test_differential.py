"""The emulated manager against the real systemd 262.1, record by record.

The same services, unit files and flow ran under both (conftest's
``systemd_tier`` in the guest, ``emulated_tier`` here). For every unit,
every start in every boot must have found the same fds in the same order
(names, what they are, sizes, seals, digests of their bytes, sessions and
their kind), done the same, and every ``liveupdate check`` before a kexec
must have said the same; the example daemon must have served the same.
A difference fails and prints both sides.

What is left out, on purpose: pids, times, fd numbers, the file type of a
session fd (an anonymous inode in the kernel, a socket in the emulator
service), the /proc name of a memfd (the kernel gives a retrieved memfd none, the emulator cannot),
the text of error messages (which name fds), and the tokens systemd gave in
its own session (it walks its units in hash order).
"""
from __future__ import annotations

import difflib
import json
from typing import Any, Dict, List

import pytest

from .conftest import Tier, units

pytestmark = pytest.mark.systemd


def _found(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    keep = ("name", "type", "size", "seals", "digest", "session", "state", "session_error")
    out = [{k: f[k] for k in keep if k in f} for f in record["found"]]
    for f in out:
        if "session" in f:
            # A kernel session is an anonymous inode, an emulated one a
            # socket: the session's name and kind say what it is.
            f.pop("type", None)
    return out


def _events(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for event in record["events"]:
        event = dict(event)
        event.pop("error", None)  # messages name fds and pids
        for files in (event.get("files"),):
            if isinstance(files, dict):
                event["files"] = {t: {k: v for k, v in f.items() if k != "link"} for t, f in files.items()}
        out.append(event)
    return out


def starts(tier: Tier, unit: str) -> List[Dict[str, Any]]:
    return [{"stage": r["stage"], "found": _found(r), "events": _events(r)} for r in tier.starts(unit)]


def verdicts(tier: Tier, stage: int, unit: str) -> List[Any]:
    check = tier.check(stage, unit)
    return [(e["name"], e["kind"], e["survives"], e["errno"], e.get("state")) for e in check.get("entries", [])]


def daemon(tier: Tier, stage: int) -> Dict[str, Any]:
    seen = tier.stages[stage].get("daemon", {})
    return {label: {key: (v or {}).get("out") for key, v in words.items() if key != "stats"}
            for label, words in seen.items()}


def both_sides(what: str, real: Any, emulated: Any) -> str:
    a = json.dumps(real, indent=1, sort_keys=True, default=str).splitlines()
    b = json.dumps(emulated, indent=1, sort_keys=True, default=str).splitlines()
    diff = "\n".join(difflib.unified_diff(a, b, "real systemd", "emulated manager", lineterm=""))
    return f"{what} differs between real systemd and the emulated manager:\n{diff}"


@pytest.fixture(scope="module")
def sides(systemd_tier: Tier, emulated_tier: Tier) -> Any:
    for tier in (systemd_tier, emulated_tier):
        assert tier.returncode == 0 and sorted(tier.stages) == [1, 2, 3], tier.explain()
    return systemd_tier, emulated_tier


@pytest.mark.parametrize("unit", [u for u in units() if u != "cache-daemon.service"])
def test_every_start_found_and_did_the_same(sides: Any, unit: str) -> None:
    real, emulated = sides
    a, b = starts(real, unit), starts(emulated, unit)
    assert a == b, both_sides(unit + "'s starts", a, b)


@pytest.mark.parametrize("stage", [1, 2])
def test_check_said_the_same(sides: Any, stage: int) -> None:
    real, emulated = sides
    a = {u: verdicts(real, stage, u) for u in units()}
    b = {u: verdicts(emulated, stage, u) for u in units()}
    assert a == b, both_sides("liveupdate check before kexec %d" % stage, a, b)


def test_the_example_daemon_served_the_same(sides: Any) -> None:
    real, emulated = sides
    a = {stage: daemon(real, stage) for stage in (1, 2, 3)}
    b = {stage: daemon(emulated, stage) for stage in (1, 2, 3)}
    assert a == b, both_sides("the example daemon", a, b)


def test_systemd_counted_the_same(sides: Any) -> None:
    real, emulated = sides
    a = [real.stages[s]["manager"] for s in (1, 2, 3)]
    b = [emulated.stages[s]["manager"] for s in (1, 2, 3)]
    assert a == b, both_sides("KExecCount", a, b)
