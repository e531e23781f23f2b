"""What the kernel shows of itself, read from files (for ``liveupdate status``).

Each reader takes the :class:`Roots` where /proc, /sys, /dev and /boot are,
so that tests and offline checks can point them at another tree. None of
them opens /dev/liveupdate.
"""
from __future__ import annotations

import errno
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "Roots",
    "SESSION_LINK",
    "DEVICE_NAME",
    "read_text",
    "kstrtobool",
    "cmdline_param",
    "kernel_config",
    "kernel_log",
    "holders",
    "has_cap",
    "name_of",
    "ask_service",
]

#: How the kernel names a session fd in /proc/PID/fd.
SESSION_LINK = "anon_inode:[luo_session]"
DEVICE_NAME = "liveupdate"
_MAX_LOG_RECORDS = 1_000_000  # a bound, not a limit the kernel's buffer reaches


@dataclass(frozen=True)
class Roots:
    """Where the kernel's file systems are mounted (``/`` normally)."""

    proc: str = "/proc"
    sys: str = "/sys"
    dev: str = "/dev"
    boot: str = "/boot"


def read_text(path: Path) -> Tuple[Optional[str], Optional[OSError]]:
    """(the file's text, None), or (None, why it could not be read)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace"), None
    except OSError as exc:
        return None, exc


def kstrtobool(value: Optional[str]) -> Optional[bool]:
    """The kernel's reading of a boolean parameter (lib/kstrtox.c): y/t/1
    and "on" are true, n/f/0 and "off" false; anything else is ignored."""
    if not value:
        return None
    first = value[0].lower()
    if first in "yt1":
        return True
    if first in "nf0":
        return False
    if first == "o" and len(value) > 1:
        second = value[1].lower()
        if second == "n":
            return True
        if second == "f":
            return False
    return None


def cmdline_param(cmdline: str, key: str) -> Tuple[bool, Optional[str]]:
    """(present, value) of ``key`` on a kernel command line. The last one
    wins, as for the kernel; words after ``--`` belong to init and are
    skipped. A bare ``key`` gives (True, None)."""
    present, value = False, None
    for word in cmdline.split():
        if word == "--":
            break
        name, sep, rest = word.partition("=")
        if name == key:
            present, value = True, (rest if sep else None)
    return present, value


def kernel_config(roots: Roots, release: str) -> Tuple[Optional[Dict[str, str]], str]:
    """The running kernel's config options, and where they were read."""
    candidates = [Path(roots.proc) / "config.gz", Path(roots.boot) / f"config-{release}"]
    for path in candidates:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        try:
            text = gzip.decompress(raw).decode("utf-8", "replace") if path.suffix == ".gz" else raw.decode("utf-8", "replace")
        except OSError:
            continue
        options: Dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                key, _, value = line.partition("=")
                options[key] = value
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                options[line[2:-len(" is not set")]] = "n"
        return options, str(path)
    return None, " or ".join(str(path) for path in candidates)


def kernel_log(roots: Roots) -> Tuple[Optional[List[str]], Optional[str]]:
    """The kernel log's messages (``/dev/kmsg``), or why they are not readable."""
    path = Path(roots.dev) / "kmsg"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return None, f"{path} needs root (kernel.dmesg_restrict)"
        return None, f"{path}: {exc.strerror}"
    chunks: List[bytes] = []
    try:
        for _ in range(_MAX_LOG_RECORDS):
            try:
                # /dev/kmsg returns one record per read, and EINVAL to a buffer
                # smaller than the record: 64 KiB is more than any record.
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # a record was overwritten meanwhile
                    continue
                return None, f"{path}: {exc.strerror}"
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    lines = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        if line.startswith(" "):
            continue  # dictionary lines (" SUBSYSTEM=...") that follow a record
        lines.append(line.split(";", 1)[1] if ";" in line.split(" ", 1)[0] else line)
    return lines, None


def holders(roots: Roots) -> Tuple[List[Dict[str, Any]], int]:
    """Processes holding /dev/liveupdate or session fds, and how many
    processes could not be looked at (not root)."""
    device_link = "/dev/" + DEVICE_NAME
    found: List[Dict[str, Any]] = []
    hidden = 0
    try:
        entries = os.listdir(roots.proc)
    except OSError:
        return [], 0
    for entry in entries:
        if not entry.isdigit():
            continue
        fd_dir = Path(roots.proc) / entry / "fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            hidden += 1
            continue
        except OSError:
            continue  # the process ended meanwhile
        device = False
        sessions = 0
        for fd in fds:
            try:
                link = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if link == device_link:
                device = True
            elif link.startswith(SESSION_LINK):
                sessions += 1
        if device or sessions:
            comm, _ = read_text(Path(roots.proc) / entry / "comm")
            found.append({"pid": int(entry), "command": (comm or "?").strip(), "device": device, "sessions": sessions})
    found.sort(key=lambda item: item["pid"])
    return found, hidden


def has_cap(status_text: Optional[str], cap: int) -> Optional[bool]:
    if status_text is None:
        return None
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> cap & 1)
            except (IndexError, ValueError):
                return None
    return None


def ask_service(address: str) -> Dict[str, Any]:
    """What the emulator service at ``address`` says of itself, or why it
    does not answer. Bounded: a status check must not hang on a stuck
    service, yet a busy one (a slow emulated machine) still gets its say."""
    try:
        from ..service import client
    except ImportError as exc:
        return {"error": f"the service client is not installed ({exc})"}
    try:
        answer = client.status(address, timeout=15.0)
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}
    keep = ("pid", "boot", "image", "liveupdate_number", "sessions_handed_out", "connections")
    return {key: answer.get(key) for key in keep}


def name_of(ident: int, module: str) -> str:
    try:
        if module == "pwd":
            import pwd

            return pwd.getpwuid(ident).pw_name
        import grp

        return grp.getgrgid(ident).gr_name
    except (KeyError, ImportError):
        return str(ident)
