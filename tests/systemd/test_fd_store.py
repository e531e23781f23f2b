"""Plain memfds in a service's fd store, under real systemd, across a plain
restart and two real ``systemctl kexec``: systemd preserves them in its own
session each time and hands them back by FDNAME (luo-plain.service)."""
from __future__ import annotations

from typing import Any, Dict, List

from scenarios import PLAIN, digest_of

from .conftest import Tier, found_names

UNIT = "luo-plain.service"


def memfds(record: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {f["name"]: f for f in record["found"]}


def assert_intact(record: Dict[str, Any], where: str) -> None:
    got = memfds(record)
    assert sorted(got) == sorted(f.name for f in PLAIN), (where, found_names(record))
    for f in PLAIN:
        item = got[f.name]
        assert item["type"] == "-", (where, f.name, item)  # a regular file: the memfd
        assert item["size"] == f.size, (where, f.name, item)
        assert item["seals"] == f.seals, (where, f.name, item)
        assert item["digest"] == digest_of(f.label, f.size), (where, f.name, item)


def test_first_start_finds_nothing_and_stores_everything(guest_ok: Tier) -> None:
    first = guest_ok.starts_in(UNIT, 1)[0]
    assert first["found"] == []
    assert first["events"] == [{"what": "stored", "names": [f.name for f in PLAIN]}]


def test_a_plain_restart_gives_everything_back(guest_ok: Tier) -> None:
    for stage in (1, 2):
        starts = guest_ok.starts_in(UNIT, stage)
        assert len(starts) == 2, [found_names(s) for s in starts]
        assert_intact(starts[1], "restart in boot %d" % stage)
        assert starts[1]["events"] == []  # nothing missing, nothing stored again


def test_every_kexec_gives_everything_back(guest_ok: Tier) -> None:
    for stage in (2, 3):
        first = guest_ok.starts_in(UNIT, stage)[0]
        assert_intact(first, "first start in boot %d" % stage)
        assert first["events"] == []


def test_the_order_reverses_at_each_kexec(guest_ok: Tier) -> None:
    # systemd lists its fd store newest first and passes it in that order;
    # across a kexec it re-adds the entries one by one from its mapping,
    # which turns the list around (measured on 262.1).
    stored = [f.name for f in PLAIN]
    orders: List[List[str]] = [found_names(guest_ok.starts_in(UNIT, 1)[1])]
    orders += [found_names(guest_ok.starts_in(UNIT, stage)[0]) for stage in (2, 3)]
    assert orders[0] == stored[::-1]
    assert orders[1] == stored
    assert orders[2] == stored[::-1]
