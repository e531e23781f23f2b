"""What of a unit's fd store will reach the next kernel, asked before a kexec.

systemd (262) carries a service's fd store through ``systemctl kexec`` when
the unit has ``FileDescriptorStorePreserve=yes`` (or ``on-success``): each
Live Update session in the store is handed over by the kernel as itself,
every other fd is preserved in systemd's own session, ``systemd``. What the
kernel cannot preserve is dropped, with a warning in the shutdown log, and
the service simply does not get it back. This module tells, entry by entry,
which is which, so that an operator learns it before the kexec, not after:

- a session: survives if it is *outgoing*; an *incoming* one (retrieved
  after the last kexec) is never handed over again (see
  :func:`carry_session`); one named ``systemd`` is skipped by systemd;
- any other fd: the kernel itself is asked. The file is preserved in a
  throwaway session that is closed at once (which preserves nothing), and
  the kernel's answer is the verdict: preserved, or the errno systemd's own
  preserve will get (ENOENT: no handler for this kind of file, only memfds
  have one; EBUSY: already preserved in another session, where it survives
  instead; EOPNOTSUPP: seals the handler cannot keep; EFBIG: too large).

It reads the unit's store through systemd's D-Bus API (``busctl``, or
``systemd-analyze fdstore``) and takes a duplicate of each stored fd from
PID 1 with ``pidfd_getfd()``: it must run as root. Opening
``/dev/liveupdate`` for the probe needs the device to be free; when it is
not, or with ``probe=False``, the verdict comes from the rules above and
says so.
"""
from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import errors

__all__ = ["StoredFd", "UnitCheck", "check_unit", "judge", "pidfd_getfd", "parse_fdstore_table"]

_SYS_PIDFD_GETFD = 438  # the same on every architecture (the unified table)
_PROBE_NAME = "liveupdate-check-%d"
_OUTPUT_MAX = 4 << 20  # what we read of busctl/systemd-analyze at most
_PID1_FDS_MAX = 1 << 16  # PID 1 fds looked at at most


@dataclass
class StoredFd:
    """One fd store entry and its fate at the next kexec."""

    name: str
    kind: str                 # "memfd", "session", "socket", "pipe", "file", "directory", "other"
    path: str                 # what /proc/1/fd says of it
    survives: Optional[bool]  # None: could not tell
    reason: str
    errno: Optional[str] = None
    session: Optional[str] = None
    state: Optional[str] = None
    probed: bool = False      # the verdict is the kernel's own answer


@dataclass
class UnitCheck:
    unit: str
    preserve: str                       # FileDescriptorStorePreserve=
    entries: List[StoredFd] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def carried(self) -> bool:
        return self.preserve in ("yes", "on-success")

    def to_dict(self) -> Dict[str, Any]:
        return {"unit": self.unit, "preserve": self.preserve, "carried": self.carried,
                "entries": [asdict(e) for e in self.entries], "notes": list(self.notes)}


def _run(argv: Sequence[str], op: str) -> str:
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise errors.make(errno.ENOENT, op, f"{argv[0]} not found: is this a systemd machine?") from None
    except subprocess.TimeoutExpired:
        raise errors.make(errno.ETIMEDOUT, op, f"{argv[0]} did not answer in 60 s") from None
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise errors.make(errno.EIO, op, f"{' '.join(argv[:2])} failed: {message[-1] if message else proc.returncode}")
    return proc.stdout[:_OUTPUT_MAX].decode("utf-8", "replace")


def _properties(unit: str) -> Dict[str, str]:
    out = _run(["systemctl", "show", unit, "-p",
                "Id,LoadState,FileDescriptorStorePreserve,NFileDescriptorStore,FileDescriptorStoreMax"],
               "check_unit")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


_DEVNO = re.compile(r"(\d+):(\d+)")


_Entry = Tuple[str, Tuple[int, int], int, str]


def _entries(unit: str) -> List[_Entry]:
    """(name, (major, minor), inode, path) of every entry, in store order,
    as ``systemd-analyze fdstore`` lists them."""
    out = _run(["systemd-analyze", "fdstore", unit], "check_unit")
    return parse_fdstore_table(out)


def parse_fdstore_table(text: str) -> List[_Entry]:
    """Rows of ``systemd-analyze fdstore``'s table. The name and the path
    may hold spaces: they are cut where the header's left-aligned columns
    start; the four columns between them are single words."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("FDNAME"):
        return []
    header = lines[0]
    type_at, path_at, flags_at = header.find(" TYPE") + 1, header.find(" PATH") + 1, header.find(" FLAGS") + 1
    if min(type_at, path_at, flags_at) <= 0:
        raise errors.make(errno.EPROTO, "check_unit", "systemd-analyze fdstore printed a table this "
                          "version does not know", header=header[:200])
    found: List[_Entry] = []
    for line in lines[1:_PID1_FDS_MAX + 1]:
        middle = line[type_at:path_at].split()
        if len(middle) != 4:
            continue  # not a row of the table
        dev = _DEVNO.fullmatch(middle[1])
        if dev is None:
            continue
        found.append((line[:type_at].rstrip(), (int(dev.group(1)), int(dev.group(2))),
                      int(middle[2]) if middle[2].isdigit() else -1, line[path_at:flags_at].rstrip()))
    return found


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of ``pid``'s fd ``fd`` (pidfd_getfd(2);
    needs ptrace rights over ``pid``: root for PID 1)."""
    from .. import _abi

    _abi.load_cdefs("kexec.h")  # declares syscall()
    lib: Any = _abi.ffi.dlopen(None)  # syscall(), declared by kexec.h
    pidfd = os.pidfd_open(pid)
    try:
        result = lib.syscall(_abi.ffi.cast("long", _SYS_PIDFD_GETFD), _abi.ffi.cast("int", pidfd),
                             _abi.ffi.cast("int", fd), _abi.ffi.cast("unsigned int", 0))
        if result < 0:
            err = _abi.ffi.errno
            raise errors.make(err, "pidfd_getfd", pid=pid, fd=fd)
        return int(result)
    finally:
        os.close(pidfd)


def _pid1_fds() -> Dict[Tuple[int, int, str], int]:
    """PID 1's fds by (device, inode, link)."""
    out: Dict[Tuple[int, int, str], int] = {}
    for name in sorted(os.listdir("/proc/1/fd"), key=lambda n: int(n) if n.isdigit() else -1)[:_PID1_FDS_MAX]:
        try:
            st = os.stat(f"/proc/1/fd/{name}")
            link = os.readlink(f"/proc/1/fd/{name}")
        except OSError:
            continue
        out.setdefault((st.st_dev, st.st_ino, link), int(name))
    return out


def _kind(mode: int, path: str) -> str:
    if path.startswith("anon_inode:[luo_session]"):
        return "session"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        # A memfd's link is /memfd:NAME (deleted); one retrieved from a
        # session is "/ (deleted)" (the kernel gives it no name).
        return "memfd" if path.startswith("/memfd:") or path == "/ (deleted)" else "file"
    return "other"


_VERDICT_BY_ERRNO = {
    errno.ENOENT: "the kernel has no Live Update handler for this kind of file (only memfds have one)",
    errno.EBUSY: "already preserved in another session: systemd's own preserve fails, and the file reaches "
                 "the next kernel only in that session",
    errno.EOPNOTSUPP: "its seals are ones the memfd handler cannot keep",
    errno.EFBIG: "too large for the memfd handler",
    errno.ENOMEM: "the kernel could not pin its pages",
    errno.EBADF: "not an open file any more",
}


class _Prober:
    """A throwaway outgoing session that the kernel is asked to preserve
    each file in; closing it preserves nothing. ``open_device`` None: the
    kernel is not asked."""

    def __init__(self, open_device: Optional[Callable[[], Any]]) -> None:
        self.session: Any = None
        self.error: Optional[OSError] = None
        self.token = 0
        self.open_device = open_device

    def __enter__(self) -> "_Prober":
        if self.open_device is None:
            return self
        try:
            with self.open_device() as dev:
                self.session = dev.create_session(_PROBE_NAME % os.getpid())
        except OSError as exc:
            self.error = exc
        return self

    def ask(self, fd: int) -> Optional[int]:
        """0 when the kernel preserves the file, else its errno; None when
        the kernel cannot be asked."""
        if self.session is None:
            return None
        self.token += 1
        try:
            self.session.preserve(fd, self.token)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def __exit__(self, *exc_info: Any) -> None:
        if self.session is not None:
            self.session.close()


def _as_session(entry: StoredFd, fd: int) -> bool:
    """Fill in ``entry`` if ``fd`` is a Live Update session (of any backend)."""
    from ..session import Session

    try:
        session = Session.from_fd(os.dup(fd))
    except OSError:
        return False
    with session:
        entry.kind, entry.session, entry.state = "session", session.name, session.state
    if entry.session == "systemd":
        entry.survives = False
        entry.reason = "a session named 'systemd' is systemd's own: it skips it"
    elif entry.state == "outgoing":
        entry.survives = True
        entry.reason = f"session {entry.session!r} is outgoing: the kernel hands it over with its files"
    elif entry.state == "incoming":
        entry.survives = False
        entry.reason = (f"session {entry.session!r} is incoming (handed over at the last kexec): the kernel "
                        "does not hand it over again; move its files into a new session "
                        "(liveupdate.systemd.carry_session) on this boot")
    else:
        entry.survives = None
        entry.reason = f"session {entry.session!r}: the kernel did not say whether it is outgoing"
    return True


def _judge_file(entry: StoredFd, dup: int, prober: _Prober) -> None:
    answer = prober.ask(dup)
    if answer is None:
        entry.survives = entry.kind == "memfd"
        entry.reason = ("a memfd: systemd preserves it in its session 'systemd' (by rule: the kernel "
                        "could not be asked)" if entry.survives else
                        "only memfds have a Live Update handler (by rule: the kernel could not be asked)")
        return
    entry.probed = True
    if answer == 0:
        entry.survives = True
        entry.reason = "systemd preserves it in its session 'systemd' (the kernel accepts it)"
        return
    entry.survives = False
    entry.errno = errno.errorcode.get(answer, str(answer))
    entry.reason = _VERDICT_BY_ERRNO.get(answer, os.strerror(answer))


#: One fd store entry to judge: its name, its /proc link, a duplicate of
#: its fd (owned by judge()) or None with the reason it could not be had.
Stored = Tuple[str, str, Optional[int], str]


def judge(unit: str, preserve: str, stored: Iterable[Stored],
          open_device: Optional[Callable[[], Any]]) -> UnitCheck:
    """The verdicts on ``stored`` for a unit whose FileDescriptorStorePreserve=
    is ``preserve``; ``open_device`` opens the device the kernel is asked
    through (None: judge by rule). Shared by :func:`check_unit` and the
    emulated service manager."""
    result = UnitCheck(unit, preserve)
    stored = list(stored)
    if not stored:
        result.notes.append("the fd store is empty")
        return result
    if not result.carried:
        result.notes.append(f"FileDescriptorStorePreserve={preserve}: systemd does not carry this "
                            "unit's fd store through a kexec (set it to yes)")
    with _Prober(open_device if result.carried else None) as prober:
        if prober.error is not None:
            result.notes.append(f"the kernel could not be asked ({prober.error.strerror}): verdicts by rule")
        for name, path, dup, why in stored:
            entry = StoredFd(name, "other", path, None, why)
            if dup is None:
                result.entries.append(entry)
                continue
            try:
                if not _as_session(entry, dup):
                    entry.kind = _kind(os.fstat(dup).st_mode, path)
                    if result.carried:
                        _judge_file(entry, dup, prober)
                if not result.carried:
                    entry.survives = False
                    entry.reason = "the unit's fd store is not carried (FileDescriptorStorePreserve=)"
            finally:
                os.close(dup)
            result.entries.append(entry)
    return result


def check_unit(unit: str, *, probe: bool = True) -> UnitCheck:
    """What of ``unit``'s fd store the next kexec keeps (see the module).

    Raises OSError: ENOENT (no such unit, or not a systemd machine), EPERM
    (not root: PID 1's fds cannot be read), EIO (systemctl failed)."""
    props = _properties(unit)
    if props.get("LoadState") == "not-found":
        raise errors.make(errno.ENOENT, "check_unit", "no such unit", unit=unit)
    name = props.get("Id", unit)
    fds = _pid1_fds()
    stored: List[Stored] = []
    try:
        for fdname, (major, minor), inode, path in _entries(name):
            pid1_fd = fds.get((os.makedev(major, minor), inode, path))
            if pid1_fd is None:
                stored.append((fdname, path, None, "not found among PID 1's fds"))
                continue
            try:
                stored.append((fdname, path, pidfd_getfd(1, pid1_fd), ""))
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    raise errors.make(errno.EPERM, "check_unit", "reading PID 1's fds needs root", unit=unit) from None
                stored.append((fdname, path, None, f"PID 1's fd {pid1_fd} could not be read ({exc.strerror})"))
    except BaseException:
        for _, _, dup, _ in stored:
            if dup is not None:
                os.close(dup)
        raise

    def open_device() -> Any:
        import liveupdate

        return liveupdate.open(backend="device", timeout=5)

    return judge(name, props.get("FileDescriptorStorePreserve", "no"), stored, open_device if probe else None)
