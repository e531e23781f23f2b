"""systemd's part in a live update, as systemd 262.1 plays it (src/core/luo.c
in PID 1, src/shared/luo-util.c in systemd-shutdown).

Before the kexec, PID 1 (``serialize_fd_stores``) writes down, for every
service whose ``FileDescriptorStorePreserve=`` is ``yes`` or
``on-success``, each fd store entry newest first: a Live Update session as
itself (``luo_session``, by its kernel name; one named ``systemd`` is
skipped), any other fd as ``fd``. systemd-shutdown (``preserve_fd_stores``)
then creates the outgoing session ``systemd``, preserves the ``fd`` entries
in it at tokens 1, 2, ... (one that the kernel refuses is logged and lost,
and takes no token), and puts the mapping, compact JSON of protocol
version 1, in a sealed memfd at token 0::

    {"version":1,"state":{"KExecCount":N,...},
     "units":{"UNIT":{"fdstore":[{"type":"fd","name":"NAME","token":1},
                                 {"type":"luo_session","name":"NAME","sessionName":"KNAME"}]}}}

After the kexec, PID 1 (``restore_fd_stores``) retrieves ``systemd``,
reads the mapping (a version above 1 is ignored whole), hands each unit its
entries back in mapping order (each is prepended to the store, so the order
turns around), counts the kexec, and finishes the session.

Where the emulation differs: systemd walks its units in hash table order,
so the tokens it gives differ from these (the per-unit result is the
same); the shutdown timestamps are this process's clocks.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "LUO_SESSION_NAME",
    "LUO_MAPPING_INDEX",
    "LUO_PROTOCOL_VERSION",
    "Serialized",
    "serialize_fd_stores",
    "preserve_fd_stores",
    "restore_fd_stores",
    "session_name_of",
    "mapping_text",
]

from .mapping import LUO_PROTOCOL_VERSION, MAPPING_MAX, parse_mapping

log = logging.getLogger("liveupdate.emulator.systemd")

LUO_SESSION_NAME = "systemd"
LUO_MAPPING_INDEX = 0
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _timestamp() -> Dict[str, int]:
    return {"realtime": time.time_ns() // 1000, "monotonic": time.monotonic_ns() // 1000}


def session_name_of(fd: int) -> Optional[str]:
    """The kernel name of a Live Update session fd, None for any other fd
    (fd_get_luo_session_name())."""
    from ...session import Session

    try:
        session = Session.from_fd(os.dup(fd))
    except OSError:
        return None
    with session:
        return session.name_bytes.decode("utf-8", "surrogateescape")


@dataclass
class Serialized:
    """What PID 1 hands systemd-shutdown: the document and, per unit, the
    fds its ``fd`` and ``luo_session`` entries refer to (dups, owned)."""

    document: Dict[str, Any]
    fds: Dict[Tuple[str, int], int] = field(default_factory=dict)  # (unit, index) -> fd

    def close(self) -> None:
        while self.fds:
            _, fd = self.fds.popitem()
            os.close(fd)


def serialize_fd_stores(stores: Sequence[Tuple[str, bool, List[Tuple[str, int]]]], kexecs: int) -> Serialized:
    """manager_luo_serialize_fd_stores(): ``stores`` is (unit, carried,
    entries newest first as (name, fd)) for each service unit."""
    units: Dict[str, Any] = {}
    fds: Dict[Tuple[str, int], int] = {}
    for unit, carried, entries in stores:
        if not carried or not entries:
            continue
        listed = []
        for fdname, fd in entries:
            kernel_name = session_name_of(fd)
            if kernel_name == LUO_SESSION_NAME:
                log.warning("Skipping fd '%s' of unit '%s' for LUO serialization, as the session name '%s' "
                            "infringes systemd's namespace.", fdname, unit, kernel_name)
                continue
            item: Dict[str, Any] = {"type": "luo_session" if kernel_name else "fd", "name": fdname}
            if kernel_name:
                item["sessionName"] = kernel_name
            fds[(unit, len(listed))] = os.dup(fd)
            listed.append(item)
        if listed:
            units[unit] = {"fdstore": listed}
    state: Dict[str, Any] = {"KExecCount": kexecs, "ShutdownStartTimestamp": _timestamp()}
    document: Dict[str, Any] = {"version": LUO_PROTOCOL_VERSION, "state": state}
    if units:
        document["units"] = units
    return Serialized(document, fds)


def mapping_text(document: Dict[str, Any]) -> str:
    """sd_json_variant_format(flags=0): compact, keys in insertion order."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def preserve_fd_stores(device: Any, serialized: Serialized) -> Tuple[Any, Dict[str, Any], List[Dict[str, Any]]]:
    """luo_preserve_fd_stores(): the ``systemd`` session (the caller keeps
    it open through the kexec), the mapping written at token 0, and what
    could not be preserved, as [{"unit", "name", "errno", "message"}]."""
    state = dict(serialized.document["state"])
    state["ShutdownFinishTimestamp"] = _timestamp()
    state["ShutdownLateStartTimestamp"] = _timestamp()
    session = device.create_session(LUO_SESSION_NAME)
    lost: List[Dict[str, Any]] = []
    units: Dict[str, Any] = {}
    token = LUO_MAPPING_INDEX + 1
    try:
        for unit, body in serialized.document.get("units", {}).items():
            kept = []
            for index, item in enumerate(body["fdstore"]):
                fd = serialized.fds[(unit, index)]
                if item["type"] == "luo_session":
                    kept.append({"type": "luo_session", "name": item["name"], "sessionName": item["sessionName"]})
                    continue
                try:
                    session.preserve(fd, token)
                except OSError as exc:
                    message = ("Failed to preserve LUO fd %d (name '%s') with token %d, will be lost across "
                               "kexec: %s" % (fd, item["name"], token, os.strerror(exc.errno or errno.EIO)))
                    log.warning("%s", message)
                    lost.append({"unit": unit, "name": item["name"], "errno": exc.errno, "message": message})
                    continue
                kept.append({"type": "fd", "name": item["name"], "token": token})
                token += 1
            if kept:
                units[unit] = {"fdstore": kept}
        state["ShutdownLateFinishTimestamp"] = _timestamp()
        mapping: Dict[str, Any] = {"version": serialized.document["version"], "state": state}
        if units:
            mapping["units"] = units
        fd = os.memfd_create("luo-mapping", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, mapping_text(mapping).encode("utf-8"))
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            session.preserve(fd, LUO_MAPPING_INDEX)
        finally:
            os.close(fd)
    except BaseException:
        session.close()
        raise
    log.info("Preserved fd stores in LUO session '%s' for kexec.", LUO_SESSION_NAME)
    return session, mapping, lost


def restore_fd_stores(device: Any, dispatch: Callable[[str, str, int], None]) -> Dict[str, Any]:
    """manager_luo_restore_fd_stores(): hands each (unit, name, fd) to
    ``dispatch`` (which owns the fd), finishes the ``systemd`` session.
    Returns {"mapping": the document or None, "kexecs": KExecCount + 1 or
    None, "lost": [what could not be retrieved]}."""
    result: Dict[str, Any] = {"mapping": None, "kexecs": None, "lost": []}
    try:
        session = device.retrieve_session(LUO_SESSION_NAME)
    except FileNotFoundError:
        return result
    try:
        mapping_fd = session.retrieve(LUO_MAPPING_INDEX)
        try:
            raw = os.pread(mapping_fd, MAPPING_MAX + 1, 0)
        finally:
            os.close(mapping_fd)
        mapping, skipped = parse_mapping(raw)
        if mapping is None:
            log.warning("Failed to parse LUO mapping JSON, skipping state restoration.")
            return result
        result["mapping"] = mapping
        if skipped is not None:
            log.warning("LUO mapping has unsupported version %d, skipping state restoration.", mapping["version"])
            return result
        state = mapping.get("state") if isinstance(mapping.get("state"), dict) else {}
        count = state.get("KExecCount", 0)
        result["kexecs"] = (count if isinstance(count, int) else 0) + 1
        units = mapping.get("units") if isinstance(mapping.get("units"), dict) else {}
        for unit, body in units.items():
            entries = body.get("fdstore") if isinstance(body, dict) else None
            if not isinstance(entries, list):
                log.warning("LUO mapping fdstore for unit '%s' is not a JSON array, skipping.", unit)
                continue
            for item in entries:
                _restore_one(device, session, unit, item, dispatch, result["lost"])
    finally:
        try:
            session.finish()
        finally:
            session.close()
    return result


def _restore_one(device: Any, session: Any, unit: str, item: Any, dispatch: Callable[[str, str, int], None],
                 lost: List[Dict[str, Any]]) -> None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return
    name, kind = item["name"], item.get("type")
    try:
        if kind == "fd":
            token = item.get("token")
            if not isinstance(token, int) or token == LUO_MAPPING_INDEX:
                return
            fd = session.retrieve(token)
        elif kind == "luo_session" and isinstance(item.get("sessionName"), str):
            fd = device.retrieve_session(item["sessionName"]).detach()
        else:
            log.warning("LUO mapping for unit '%s' fd '%s': unknown type '%s', skipping.", unit, name, kind)
            return
    except OSError as exc:
        what = ("LUO fd for unit '%s' name '%s' token %s" % (unit, name, item.get("token")) if kind == "fd" else
                "LUO session '%s' for unit '%s' name '%s'" % (item.get("sessionName"), unit, name))
        message = "Failed to retrieve %s: %s" % (what, os.strerror(exc.errno or errno.EIO))
        log.warning("%s", message)
        lost.append({"unit": unit, "name": name, "errno": exc.errno, "message": message})
        return
    dispatch(unit, name, fd)
