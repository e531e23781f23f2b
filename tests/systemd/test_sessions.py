"""Live Update sessions in the fd store under real systemd: one the service
makes itself (luo-own*.service) and one systemd makes for ``LUOSession=``
(luo-libd*.service), across a plain restart and two real kexecs. The
"carry" services call ``liveupdate.systemd.carry_session`` on every boot
after a kexec; the "keep" ones only retrieve, and lose the session at the
second kexec, because the kernel hands a session over once."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

from scenarios import LUO_FDNAME, OWN_CARRY, OWN_FDNAME, OWN_KEEP, SESSION_FILES, digest_of, luo_session_kernel_name

from .conftest import Tier, events

FDNAME = {"luo-own.service": OWN_FDNAME, "luo-own-keep.service": OWN_FDNAME,
          "luo-libd.service": LUO_FDNAME, "luo-libd-keep.service": LUO_FDNAME}
KERNEL_NAME = {"luo-own.service": OWN_CARRY, "luo-own-keep.service": OWN_KEEP,
               "luo-libd.service": luo_session_kernel_name("luo-libd.service", LUO_FDNAME),
               "luo-libd-keep.service": luo_session_kernel_name("luo-libd-keep.service", LUO_FDNAME)}


def session_entry(record: Dict[str, Any], name: str) -> Dict[str, Any]:
    entries = [f for f in record["found"] if f["name"] == name]
    assert len(entries) <= 1, record["found"]
    return entries[0] if entries else {}


def assert_files(files: Dict[str, Dict[str, Any]], where: str) -> None:
    assert sorted(files) == sorted(str(t) for t in SESSION_FILES), (where, files)
    for token, f in SESSION_FILES.items():
        item = files[str(token)]
        assert (item["size"], item["seals"], item["digest"]) == (f.size, f.seals, digest_of(f.label, f.size)), \
            (where, token, item)


def the_event(record: Dict[str, Any], what: str) -> Dict[str, Any]:
    found = events(record, what)
    assert len(found) == 1, (what, record["events"])
    return found[0]


@pytest.mark.parametrize("unit", ["luo-own.service", "luo-own-keep.service"])
def test_own_session_first_start_and_restart(guest_ok: Tier, unit: str) -> None:
    first, restarted = guest_ok.starts_in(unit, 1)
    assert session_entry(first, OWN_FDNAME) == {}
    assert the_event(first, "created")["session"] == KERNEL_NAME[unit]
    # After a plain restart systemd hands the session back, still outgoing,
    # still holding its files (a preserve at a used token is EEXIST).
    entry = session_entry(restarted, OWN_FDNAME)
    assert (entry["session"], entry["state"]) == (KERNEL_NAME[unit], "outgoing")
    assert the_event(restarted, "restarted")["probe"] == "EEXIST"


@pytest.mark.parametrize("unit", ["luo-libd.service", "luo-libd-keep.service"])
def test_luosession_first_start_and_restart(guest_ok: Tier, unit: str) -> None:
    first, restarted = guest_ok.starts_in(unit, 1)
    # systemd made the session before the service started: outgoing, empty,
    # under the configured name; its kernel name comes from the unit's.
    entry = session_entry(first, LUO_FDNAME)
    assert (entry["session"], entry["state"]) == (KERNEL_NAME[unit], "outgoing")
    assert the_event(first, "outgoing")["preserve"] == {str(t): "preserved" for t in SESSION_FILES}
    # A restart gets the same session back (not a new one), files and all.
    entry = session_entry(restarted, LUO_FDNAME)
    assert (entry["session"], entry["state"]) == (KERNEL_NAME[unit], "outgoing")
    assert the_event(restarted, "outgoing")["preserve"] == {str(t): "EEXIST" for t in SESSION_FILES}


@pytest.mark.parametrize("unit", ["luo-own.service", "luo-libd.service"])
def test_carried_sessions_reach_the_third_kernel(guest_ok: Tier, unit: str) -> None:
    name = FDNAME[unit]
    for stage in (2, 3):
        first = guest_ok.starts_in(unit, stage)[0]
        entry = session_entry(first, name)
        assert (entry.get("session"), entry.get("state")) == (KERNEL_NAME[unit], "incoming"), (stage, first)
        carried = the_event(first, "carried")
        assert (carried["session"], carried["state"]) == (KERNEL_NAME[unit], "outgoing")
        assert_files(carried["files"], "%s, boot %d" % (unit, stage))
        # Nothing of the carry is left in the fd store.
        assert [f["name"] for f in first["found"]] == [name]
    # After the carry, a restart in the same boot finds the new session.
    restarted = guest_ok.starts_in(unit, 2)[1]
    entry = session_entry(restarted, name)
    assert (entry["session"], entry["state"]) == (KERNEL_NAME[unit], "outgoing")


def test_a_session_only_retrieved_is_gone_after_the_second_kexec(guest_ok: Tier) -> None:
    unit = "luo-own-keep.service"
    boot2 = guest_ok.starts_in(unit, 2)[0]
    assert session_entry(boot2, OWN_FDNAME)["state"] == "incoming"
    assert_files(the_event(boot2, "retrieved")["files"], "boot 2")
    boot3 = guest_ok.starts_in(unit, 3)[0]
    assert session_entry(boot3, OWN_FDNAME) == {}  # systemd could not retrieve it
    assert events(boot3, "created")  # so the service starts from nothing


def test_a_luosession_only_retrieved_comes_back_fresh(guest_ok: Tier) -> None:
    unit = "luo-libd-keep.service"
    boot2 = guest_ok.starts_in(unit, 2)[0]
    assert session_entry(boot2, LUO_FDNAME)["state"] == "incoming"
    assert_files(the_event(boot2, "retrieved")["files"], "boot 2")
    # systemd hands out a new, empty session of the same kernel name.
    boot3 = guest_ok.starts_in(unit, 3)[0]
    entry = session_entry(boot3, LUO_FDNAME)
    assert (entry["session"], entry["state"]) == (KERNEL_NAME[unit], "outgoing")
    assert the_event(boot3, "outgoing")["preserve"] == {str(t): "preserved" for t in SESSION_FILES}


def test_systemd_counts_the_kexecs(guest_ok: Tier) -> None:
    counts: List[str] = [guest_ok.stages[stage]["manager"] for stage in (1, 2, 3)]
    assert counts == ["KExecCount=0", "KExecCount=1", "KExecCount=2"]
