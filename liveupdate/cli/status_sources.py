"""What the kernel shows of itself, read from files (for ``liveupdate status``).

Each reader takes the :class:`Roots` where /proc, /sys, /dev and /boot are,
so that tests and offline checks can point them at another tree. None of
them opens /dev/liveupdate.
"""
from __future__ import annotations

import errno
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Pattern, Tuple

__all__ = [
    "Roots",
    "SESSION_LINK",
    "DEVICE_NAME",
    "read_text",
    "read_bounded",
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
#: Any /proc or /sys text file status reads: /proc/cmdline is at most the
#: kernel's COMMAND_LINE_SIZE (2048 bytes on x86-64), the others are shorter.
TEXT_MAX = 64 * 1024
#: A kernel .config is about 300 KB (allyesconfig under 500 KB) and under
#: 150 KB gzip'ed: 16 MiB of text and 4 MiB compressed leave room for any,
#: and stop a gzip bomb or a huge file early.
CONFIG_MAX = 16 << 20
CONFIG_GZ_MAX = 4 << 20
#: The kernel's largest log buffer (CONFIG_LOG_BUF_SHIFT=25): more is not a log.
LOG_MAX = 32 << 20


@dataclass(frozen=True)
class Roots:
    """Where the kernel's file systems are mounted (``/`` normally)."""

    proc: str = "/proc"
    sys: str = "/sys"
    dev: str = "/dev"
    boot: str = "/boot"


def read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``.

    Opened without blocking (a FIFO planted there must not hang status) and
    refused unless regular (/dev/zero would never end). Raises OSError:
    EINVAL for a file that is not regular, EFBIG past ``limit``, and what
    open/read say."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "not a regular file"
            raise OSError(errno.EINVAL, f"{kind}, not a regular file", str(path))
        chunks: List[bytes] = []
        size = 0
        # /proc and /sys files report st_size 0: read until EOF, bounded.
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return b"".join(chunks)


def read_text(path: Path, limit: int = TEXT_MAX) -> Tuple[Optional[str], Optional[OSError]]:
    """(the file's text, None), or (None, why it could not be read): see
    :func:`read_bounded`."""
    try:
        return read_bounded(path, limit).decode("utf-8", errors="replace"), None
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


def _decompress_config(raw: bytes) -> str:
    """The text of a gzip'ed config, bounded. Raises ValueError saying
    what is wrong with the data."""
    if not raw:
        raise ValueError("empty, not gzip data")
    if raw[:2] != b"\x1f\x8b":
        raise ValueError("not gzip data")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        text = inflater.decompress(raw, CONFIG_MAX + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt gzip data ({exc})") from None
    if len(text) > CONFIG_MAX:
        raise ValueError(f"decompresses to more than {CONFIG_MAX >> 20} MiB, which no kernel config does")
    if not inflater.eof:
        raise ValueError("truncated gzip data")
    return text.decode("utf-8", "replace")


def _parse_config(text: str) -> Dict[str, str]:
    options: Dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            options[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2:-len(" is not set")]] = "n"
    return options


def kernel_config(roots: Roots, release: str) -> Tuple[Optional[Dict[str, str]], str, List[str]]:
    """The running kernel's config options, where they were read (or
    looked for), and what was wrong with each candidate that exists but
    could not be used (damaged, not gzip, not a regular file, too large)."""
    candidates = [Path(roots.proc) / "config.gz", Path(roots.boot) / f"config-{release}"]
    problems: List[str] = []
    for path in candidates:
        gzipped = path.suffix == ".gz"
        try:
            raw = read_bounded(path, CONFIG_GZ_MAX if gzipped else CONFIG_MAX)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        try:
            text = _decompress_config(raw) if gzipped else raw.decode("utf-8", "replace")
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        return _parse_config(text), str(path), problems
    return None, " or ".join(str(path) for path in candidates), problems


def kernel_log(roots: Roots, wanted: Optional[Pattern[str]] = None) -> Tuple[Optional[List[str]], Optional[str]]:
    """The kernel log's messages (``/dev/kmsg``), or why they are not
    readable. With ``wanted``, only the first message and those it matches
    are kept; at most :data:`LOG_MAX` bytes are read in any case."""
    path = Path(roots.dev) / "kmsg"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return None, f"{path} needs root (kernel.dmesg_restrict)"
        return None, f"{path}: {exc.strerror}"
    lines: List[str] = []
    total = 0
    try:
        while total < LOG_MAX:
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
            total += len(chunk)
            for line in chunk.decode("utf-8", "replace").splitlines():
                if line.startswith(" "):
                    continue  # dictionary lines (" SUBSYSTEM=...") that follow a record
                message = line.split(";", 1)[1] if ";" in line.split(" ", 1)[0] else line
                if wanted is None or not lines or wanted.search(message):
                    lines.append(message)
    finally:
        os.close(fd)
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
