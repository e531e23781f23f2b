"""What ``liveupdate inspect`` shows of a ``systemd`` session: the mapping
systemd keeps at its token 0 (version, kexec count, each unit's fd store
entries), each entry beside the file or session it names in the image.

The mapping is read the way the next kernel's PID 1 reads it: an emulated
kernel boots from the image's memory (as inspect read it, not read again)
and the session's token 0 is retrieved from it, so what is shown is what systemd would find (an image that cannot boot
says so instead).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, TextIO

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..emulator.kho import PhysicalMemory

__all__ = ["SESSION", "systemd_mapping", "render_mapping"]

SESSION = "systemd"
_MAPPING_TOKEN = 0


def _read_mapping(memory: "PhysicalMemory") -> bytes:
    from ..emulator import Emulator
    from ..emulator.systemd.mapping import MAPPING_MAX

    with Emulator(memory=memory).open() as dev, dev.retrieve_session(SESSION) as session:
        fd = session.retrieve(_MAPPING_TOKEN)
        try:
            return os.pread(fd, MAPPING_MAX + 1, 0)
        finally:
            os.close(fd)


def _file_summary(entry: Optional[Dict[str, Any]]) -> str:
    if entry is None:
        return "no file at that token in this image"
    memfd = entry.get("memfd")
    if memfd is None:
        return f"a {entry['handler']} file"
    return f"memfd of {memfd['size']} bytes"


def systemd_mapping(memory: "PhysicalMemory", doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The decoded mapping of the ``systemd`` session in ``memory`` (the
    image inspect has decoded into ``doc``; booted here), each entry
    with ``found`` (what the image holds for it); None when the image has
    no such session."""
    from ..emulator.systemd.mapping import describe_mapping
    from ..errors import KernelPanic

    session = next((s for s in doc["sessions"] if s["name"] == SESSION), None)
    if session is None:
        return None
    files = {f["token"]: f for f in session["files"]}
    if _MAPPING_TOKEN not in files:
        return {"version": None, "kexec_count": None, "units": [],
                "note": f"no file at token {_MAPPING_TOKEN}: systemd would restore nothing"}
    try:
        raw = _read_mapping(memory)
    except (OSError, KernelPanic) as exc:
        return {"version": None, "kexec_count": None, "units": [],
                "note": f"the mapping could not be read: {exc}"}
    shown = describe_mapping(raw)
    names = {s["name"] for s in doc["sessions"]}
    for unit in shown["units"]:
        for entry in unit["fdstore"]:
            if entry.get("type") == "fd":
                token = entry.get("token")
                entry["found"] = (_file_summary(files.get(token)) if type(token) is int and token != _MAPPING_TOKEN
                                  else "an invalid token: systemd skips it")
            elif entry.get("type") == "luo_session":
                entry["found"] = ("a session in this image" if entry.get("session") in names
                                  else "no such session in this image: lost")
    return shown


def _entry_line(entry: Dict[str, Any]) -> str:
    if "problem" in entry:
        return str(entry["problem"])
    name = entry.get("name")
    if entry.get("type") == "fd":
        return f"{name!r}: token {entry.get('token')}: {entry['found']}"
    if entry.get("type") == "luo_session":
        return f"{name!r}: session {entry.get('session')!r}: {entry['found']}"
    return f"{name!r}: unknown type {entry.get('type')!r}: systemd skips it"


def render_mapping(shown: Dict[str, Any], out: TextIO) -> None:
    w = out.write
    if shown["note"] is not None:
        w(f"  systemd's mapping (token {_MAPPING_TOKEN}): systemd would skip it: {shown['note']}\n")
        if shown.get("raw") is not None:
            w(f"    raw: {shown['raw']!r}\n")
        return
    w(f"  systemd's mapping (token {_MAPPING_TOKEN}): version {shown['version']}, "
      f"KExecCount {shown['kexec_count']}, {len(shown['units'])} unit(s)\n")
    units: List[Dict[str, Any]] = shown["units"]
    for unit in units:
        w(f"    unit {unit['unit']}: {len(unit['fdstore'])} fd store entr{'y' if len(unit['fdstore']) == 1 else 'ies'}"
          + (f" ({unit['problem']})" if "problem" in unit else "") + "\n")
        for entry in unit["fdstore"]:
            w(f"      {_entry_line(entry)}\n")
