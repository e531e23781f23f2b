"""The mapping systemd puts at token 0 of its ``systemd`` session: how PID 1
in the next kernel reads it (``restore_fd_stores``) and how ``liveupdate
inspect`` shows it. One reader for both, so that inspect never claims a
mapping is fine that systemd would skip.

A mapping is compact JSON, ``{"version": 1, "state": {...}, "units":
{UNIT: {"fdstore": [ENTRY, ...]}}}``; systemd 262 skips the whole mapping
when it is no JSON object, has no integer ``version``, or a version above
the one it writes.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["LUO_PROTOCOL_VERSION", "MAPPING_MAX", "parse_mapping", "describe_mapping"]

LUO_PROTOCOL_VERSION = 1
# PID 1 reads the whole memfd; a mapping of thousands of units is tens of KiB
MAPPING_MAX = 16 << 20
_RAW_SHOWN = 4096


def parse_mapping(raw: bytes) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``(document, None)`` when systemd would use the mapping; otherwise
    ``(document or None, why it is skipped)``: the document is still given
    when it is JSON of a version this reader does not know."""
    if len(raw) > MAPPING_MAX:
        return None, f"over {MAPPING_MAX} bytes"
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(document, dict) or type(document.get("version")) is not int:
        return None, "no JSON object with an integer version"
    if document["version"] > LUO_PROTOCOL_VERSION:
        return document, f"version {document['version']} is newer than the {LUO_PROTOCOL_VERSION} known here"
    return document, None


def _entries(body: Any) -> Optional[List[Dict[str, Any]]]:
    items = body.get("fdstore") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return None
    shown = []
    for item in items:
        if not isinstance(item, dict):
            shown.append({"problem": f"not an object: {json.dumps(item)[:80]}"})
            continue
        entry: Dict[str, Any] = {"name": item.get("name"), "type": item.get("type")}
        if item.get("type") == "fd":
            entry["token"] = item.get("token")
        elif item.get("type") == "luo_session":
            entry["session"] = item.get("sessionName")
        shown.append(entry)
    return shown


def describe_mapping(raw: bytes) -> Dict[str, Any]:
    """The mapping as plain data for people and machines: ``version``,
    ``kexec_count``, ``units`` (each ``{"unit", "fdstore": [{"name",
    "type", "token" or "session"}]}``), and ``note`` saying why systemd
    would skip it (then ``raw`` holds its start, as text)."""
    document, why = parse_mapping(raw)
    shown: Dict[str, Any] = {"version": None, "kexec_count": None, "units": [], "note": why}
    if why is not None:
        shown["raw"] = raw[:_RAW_SHOWN].decode("utf-8", "backslashreplace")
    if document is None:
        return shown
    shown["version"] = document["version"]
    if why is not None:
        return shown
    state = document.get("state")
    count = state.get("KExecCount") if isinstance(state, dict) else None
    shown["kexec_count"] = count if type(count) is int else None
    units = document.get("units")
    for unit, body in (units.items() if isinstance(units, dict) else ()):
        entries = _entries(body)
        shown["units"].append({"unit": unit, "fdstore": entries if entries is not None else [],
                               **({} if entries is not None else {"problem": "fdstore is not a JSON array"})})
    return shown
