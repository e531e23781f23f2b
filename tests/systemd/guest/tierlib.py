"""What the services of the systemd tier share: the data they keep and how
they say what they found.

Test scaffolding, not library code: the services themselves use only
``liveupdate``'s public API. Each start of a service appends one record to
``REPORTS/UNIT.jsonl``: the boot it ran in, every fd systemd passed
(``LISTEN_FDS``, in order, with what it is: its size, seals and a digest of
its bytes for a memfd; its kernel name and state for a session), and what
the service did. The records are kept on the guest's disk, which survives
each kexec, and the stage driver copies them to the host.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import time
from typing import Any, Dict, List, Optional

# The emulated run (tests/systemd/emulated.py) points these elsewhere.
REPORTS = os.environ.get("LUO_TIER_REPORTS", "/var/lib/luo-tier/reports")
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
SEAL_SEAL, SEAL_SHRINK, SEAL_GROW, SEAL_WRITE, SEAL_FUTURE_WRITE = 0x1, 0x2, 0x4, 0x8, 0x10


def pattern(label: str, size: int) -> bytes:
    """``size`` bytes that only ``label`` gives: stage 1 writes them, every
    later boot (and the host) knows what to expect."""
    block = hashlib.sha256(label.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def memfd(label: str, size: int, seals: int = 0) -> int:
    fd = os.memfd_create(label, os.MFD_ALLOW_SEALING)
    data = pattern(label, size)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if seals:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    return fd


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def boot_id() -> str:
    if os.environ.get("LUO_TIER_BOOT"):  # an emulated kexec keeps the host's boot id
        return os.environ["LUO_TIER_BOOT"]
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def describe_file(fd: int) -> Dict[str, Any]:
    """What a memfd (or any fd) is, as the host compares it."""
    out: Dict[str, Any] = {}
    try:
        out["link"] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        out["link"] = f"error {exc.errno}"
    st = os.fstat(fd)
    out["type"] = stat.filemode(st.st_mode)[0]
    if stat.S_ISREG(st.st_mode):
        out["size"] = st.st_size
        try:
            out["seals"] = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError as exc:
            out["seals"] = f"error {exc.errno}"
        out["digest"] = digest(read_all(fd))
    return out


def describe_listen_fds() -> List[Dict[str, Any]]:
    """Every fd systemd passed, in LISTEN_FDS order, without adopting any."""
    import liveupdate
    from liveupdate import systemd

    found = []
    for entry in systemd.listen_fds():
        item: Dict[str, Any] = {"name": entry.name}
        item.update(describe_file(entry.fd))
        try:
            session = liveupdate.Session.from_fd(os.dup(entry.fd))
        except OSError as exc:
            if exc.errno != errno.ENOTTY:
                item["session_error"] = exc.errno
        else:
            item["session"] = session.name
            item["state"] = session.state
            session.close()
        found.append(item)
    return found


class Report:
    """One start of a service: what it found, then what it did."""

    def __init__(self, unit: str) -> None:
        self.record: Dict[str, Any] = {
            "unit": unit,
            "boot": boot_id(),
            "pid": os.getpid(),
            "time": time.time(),
            "found": describe_listen_fds(),
            "events": [],
        }

    def event(self, what: str, **details: Any) -> None:
        self.record["events"].append(dict(details, what=what))

    def write(self) -> None:
        os.makedirs(REPORTS, exist_ok=True)
        path = os.path.join(REPORTS, self.record["unit"] + ".jsonl")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(self.record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def error_of(exc: BaseException) -> Dict[str, Any]:
    return {"errno": getattr(exc, "errno", None), "error": str(exc)[:300]}


def ready_and_wait() -> None:
    from liveupdate import systemd

    systemd.notify("READY=1")
    while True:
        time.sleep(3600)


def file_record(fd: int, label: Optional[str] = None) -> Dict[str, Any]:
    out = describe_file(fd)
    if label is not None:
        out["label"] = label
    return out
