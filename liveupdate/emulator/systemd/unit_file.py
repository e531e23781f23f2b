"""Reading a service unit file, the part of systemd's syntax the emulated
manager plays (systemd.syntax(7), systemd.service(5)).

The syntax: ``[Section]`` headers, ``Key=Value`` lines, comments from ``#``
or ``;`` at the start of a line, a trailing backslash joining a line to the
next, and, for list settings, an empty assignment (``Key=``) resetting the
list. What it means: only the keys below. A key the emulated manager does
not play is refused with its file and line, never ignored: a unit tested
here would otherwise behave differently under the real systemd without a
word.
"""
from __future__ import annotations

import errno
import os
import shlex
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ...errors import make

__all__ = ["Unit", "parse_unit", "load_unit", "read_unit_file", "UNDERSTOOD", "luo_session_name_is_valid"]

#: The longest unit file read (systemd's own limit on a fragment is far
#: above any real unit; this only stops a runaway read).
_FILE_MAX = 1 << 20
_PRESERVE = ("no", "yes", "restart", "on-success")
_TYPES = ("notify", "simple", "exec")
_NOTIFY_ACCESS = ("none", "main", "exec", "all")


@dataclass
class Unit:
    """A service unit as the emulated manager runs it."""

    name: str
    description: str = ""
    after: List[str] = field(default_factory=list)
    wanted_by: List[str] = field(default_factory=list)
    type: str = "simple"
    exec_start: List[str] = field(default_factory=list)
    environment: Dict[str, str] = field(default_factory=dict)
    fd_store_max: int = 0
    fd_store_preserve: str = "restart"
    notify_access: Optional[str] = None
    luo_sessions: List[str] = field(default_factory=list)

    @property
    def effective_fd_store_max(self) -> int:
        """FileDescriptorStoreMax= plus one per LUOSession= name (systemd
        262 adds them, whatever its manual's "at least" says)."""
        return self.fd_store_max + len(self.luo_sessions)

    @property
    def effective_notify_access(self) -> str:
        """NotifyAccess=, or what systemd implies without it: main for a
        notify service or one with an fd store, none otherwise."""
        if self.notify_access is not None:
            return self.notify_access
        if self.type == "notify" or self.effective_fd_store_max > 0:
            return "main"
        return "none"

    @property
    def carried_through_kexec(self) -> bool:
        """Whether systemd serializes this unit's fd store at a kexec."""
        return self.fd_store_preserve in ("yes", "on-success")


def luo_session_name_is_valid(name: str) -> bool:
    """systemd 262's check of a ``LUOSession=`` name: 1 to 255 bytes of
    printable ASCII without white space, none of ``: \\ " ' * ? [``."""
    if not name or len(name) > 255:
        return False
    return all("\x21" <= ch <= "\x7e" and ch not in ":\\\"'*?[" for ch in name)


def _int(value: str, where: str, key: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 9:
        raise _refused(where, f"{key}= takes a number, not {value!r}")
    return int(value)


def _choice(choices: Tuple[str, ...]) -> Callable[[str, str, str], str]:
    def parse(value: str, where: str, key: str) -> str:
        if value not in choices:
            raise _refused(where, f"{key}= takes one of {', '.join(choices)}, not {value!r}")
        return value

    return parse


def _refused(where: str, why: str) -> OSError:
    return make(errno.EINVAL, "load_unit", f"{where}: {why}")


def _set(attr: str, parse: Optional[Callable[[str, str, str], object]] = None) -> Callable[[Unit, str, str, str], None]:
    def apply(unit: Unit, value: str, where: str, key: str) -> None:
        setattr(unit, attr, parse(value, where, key) if parse else value)

    return apply


def _words(attr: str) -> Callable[[Unit, str, str, str], None]:
    def apply(unit: Unit, value: str, where: str, key: str) -> None:
        if not value:
            setattr(unit, attr, [])
            return
        getattr(unit, attr).extend(value.split())

    return apply


def _exec_start(unit: Unit, value: str, where: str, key: str) -> None:
    if not value:
        unit.exec_start = []
        return
    # systemd's own prefixes (@, -, :, +, !) change how it runs the command;
    # none is played here.
    if value[0] in "@-:+!":
        raise _refused(where, f"ExecStart= prefix {value[0]!r} is not played by the emulated manager")
    if unit.exec_start:
        raise _refused(where, "ExecStart= is given twice: a service has one command (Type=oneshot is not played)")
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise _refused(where, f"ExecStart= cannot be split into words: {exc}") from None
    if not argv or not os.path.isabs(argv[0]) and "/" in argv[0]:
        raise _refused(where, "ExecStart= needs a command (an absolute path, or a name found on $PATH)")
    unit.exec_start = argv


def _environment(unit: Unit, value: str, where: str, key: str) -> None:
    if not value:
        unit.environment.clear()
        return
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise _refused(where, f"Environment= cannot be split: {exc}") from None
    for word in words:
        name, sep, val = word.partition("=")
        if not sep or not name:
            raise _refused(where, f"Environment= takes NAME=VALUE words, not {word!r}")
        unit.environment[name] = val


def _luo_session(unit: Unit, value: str, where: str, key: str) -> None:
    if not value:
        unit.luo_sessions = []
        return
    for name in value.split():
        if not luo_session_name_is_valid(name):
            # systemd warns and ignores the name; a test wants to know.
            raise _refused(where, f"LUOSession= name {name!r} is not valid (printable ASCII, no white space, "
                                  "none of : \\ \" ' * ? [)")
        if name not in unit.luo_sessions:
            unit.luo_sessions.append(name)
    unit.luo_sessions.sort()


#: section -> key -> how to apply it. Everything else is refused.
UNDERSTOOD: Dict[str, Dict[str, Callable[[Unit, str, str, str], None]]] = {
    "Unit": {
        "Description": _set("description"),
        "Documentation": lambda unit, value, where, key: None,
        "After": _words("after"),
    },
    "Service": {
        "Type": _set("type", _choice(_TYPES)),
        "ExecStart": _exec_start,
        "Environment": _environment,
        "FileDescriptorStoreMax": _set("fd_store_max", _int),
        "FileDescriptorStorePreserve": _set("fd_store_preserve", _choice(_PRESERVE)),
        "NotifyAccess": _set("notify_access", _choice(_NOTIFY_ACCESS)),
        "LUOSession": _luo_session,
    },
    "Install": {
        "WantedBy": _words("wanted_by"),
    },
}


def _logical_lines(text: str) -> List[Tuple[int, str]]:
    """(line number, text) with continuations joined and comments dropped."""
    out: List[Tuple[int, str]] = []
    pending: Optional[Tuple[int, str]] = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if pending is None and (not line or line[0] in "#;"):
            continue
        if pending is not None:
            if line and line[0] in "#;":
                continue  # a comment inside a continued line is skipped
            start, before = pending
            line = before + " " + line
            number = start
        if line.endswith("\\"):
            pending = (number, line[:-1].rstrip())
            continue
        pending = None
        out.append((number, line))
    if pending is not None:
        out.append(pending)
    return out


def parse_unit(text: str, name: str, source: str = "<unit>") -> Unit:
    """The unit named ``name`` (``foo.service``) from its file's ``text``.

    Raises OSError EINVAL, naming ``source`` and the line, for a syntax
    error, a key outside its section, a bad value or a key the emulated
    manager does not play."""
    if not name.endswith(".service") or "/" in name or len(name) > 255:
        raise make(errno.EINVAL, "load_unit", "a unit name is NAME.service", unit=name)
    unit = Unit(name)
    section: Optional[str] = None
    for number, line in _logical_lines(text):
        where = f"{source}:{number}"
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise _refused(where, f"a section header is [Name], not {line[:60]!r}")
            section = line[1:-1]
            if section not in UNDERSTOOD:
                raise _refused(where, f"section [{section}] is not played by the emulated manager "
                                      f"(it plays {', '.join('[%s]' % s for s in UNDERSTOOD)})")
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise _refused(where, f"expected Key=Value, not {line[:60]!r}")
        if section is None:
            raise _refused(where, f"{key}= comes before any [Section]")
        apply = UNDERSTOOD[section].get(key)
        if apply is None:
            raise _refused(where, f"[{section}] {key}= is not played by the emulated manager; it plays "
                                  f"{', '.join(k + '=' for k in UNDERSTOOD[section])}")
        apply(unit, value, where, key)
    if not unit.exec_start:
        raise make(errno.EINVAL, "load_unit", f"{source}: the unit has no ExecStart=", unit=name)
    return unit


def read_unit_file(path: str) -> str:
    """The text of the unit file at ``path``: a regular file (a FIFO would
    block, a device never end), at most 1 MiB, UTF-8. Raises OSError
    EINVAL or EFBIG (its detail starts with ``path``), or what open says."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise make(errno.EINVAL, "load_unit", f"{path}: not a regular file")
        data = os.read(fd, _FILE_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > _FILE_MAX:
        raise make(errno.EFBIG, "load_unit", f"{path}: over {_FILE_MAX} bytes, no unit file is that long")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise make(errno.EINVAL, "load_unit", f"{path}: not UTF-8 (byte {exc.start})") from None


def load_unit(path: str, name: Optional[str] = None) -> Unit:
    """The unit in the file at ``path``, named after the file unless
    ``name`` is given. Refuses what :func:`read_unit_file` refuses and what
    :func:`parse_unit` does, in one line."""
    return parse_unit(read_unit_file(path), name or os.path.basename(path), path)
