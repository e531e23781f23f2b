"""The one reader of systemd's mapping: what restore uses and inspect shows,
on mappings systemd 262 would use and on those it would skip."""
from __future__ import annotations

import json

from liveupdate.emulator.systemd.mapping import MAPPING_MAX, describe_mapping, parse_mapping

GOOD = {"version": 1, "state": {"KExecCount": 2},
        "units": {"a.service": {"fdstore": [{"type": "fd", "name": "data", "token": 3},
                                            {"type": "luo_session", "name": "s", "sessionName": "k"}]}}}


def raw(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def test_a_mapping_systemd_uses() -> None:
    assert parse_mapping(raw(GOOD)) == (GOOD, None)
    shown = describe_mapping(raw(GOOD))
    assert shown["note"] is None and shown["version"] == 1 and shown["kexec_count"] == 2
    assert shown["units"] == [{"unit": "a.service", "fdstore": [
        {"name": "data", "type": "fd", "token": 3}, {"name": "s", "type": "luo_session", "session": "k"}]}]


def test_a_newer_version_is_shown_raw_with_a_note() -> None:
    newer = dict(GOOD, version=2)
    document, why = parse_mapping(raw(newer))
    assert document == newer and "version 2 is newer" in why
    shown = describe_mapping(raw(newer))
    assert shown["version"] == 2 and shown["units"] == [] and shown["raw"].startswith('{"version":2')


def test_what_systemd_skips_whole_is_shown_raw() -> None:
    for text, why in ((b"\xff\xfe", "not JSON"), (b"[1]", "integer version"), (b'{"version":"1"}', "integer version"),
                      (b'{"version":true}', "integer version"), (b"{", "not JSON")):
        shown = describe_mapping(text)
        assert why in shown["note"] and shown["version"] is None and shown["raw"] is not None
    assert "over" in describe_mapping(b" " * (MAPPING_MAX + 1))["note"]


def test_entries_of_the_wrong_shape_are_listed_not_fatal() -> None:
    odd = {"version": 1, "units": {"a.service": {"fdstore": [7, {"type": "socket", "name": "x"}]},
                                   "b.service": {"fdstore": "no"}}}
    shown = describe_mapping(raw(odd))
    assert shown["kexec_count"] is None
    first, second = shown["units"]
    assert first["fdstore"][0]["problem"].startswith("not an object: 7")
    assert first["fdstore"][1] == {"name": "x", "type": "socket"}
    assert second == {"unit": "b.service", "fdstore": [], "problem": "fdstore is not a JSON array"}
