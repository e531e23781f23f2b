"""The uapi as data: ioctl numbers, struct layouts, packers and the command
table (private).

The C declarations live in ``cdefs/liveupdate.h``. Importing the package
reads the header's constants with a few string operations (cffi's C parser
took most of the import time, and a daemon's blackout after a kexec
includes its own start); the hot path packs its arguments with
:mod:`struct`. cffi itself loads only where it is really used (the kexec
syscalls, ``pidfd_getfd``) and in the tests, which check every packer and
the constants read here against cffi's view of the same header
(:func:`check_layouts`), so the two can never drift apart silently.

:data:`COMMAND_TABLE` is the one statement of the ioctl contract, a row per
command as the kernel's ``IOCTL_OP`` tables have it (luo_core.c for the
device, luo_session.c for sessions): its number, its struct, the smallest
size the kernel takes (``offsetofend`` of the last field it needs), which
file it is for, which kinds of session accept it, and whether its result
carries a new fd (and where). The binding, the emulator and the service
read their rules from it; a new ioctl is one row here (and its handler).
"""
from __future__ import annotations

import os
import struct

TYPE_CHECKING = False  # typing is for annotations only: a cheap import (see device.py)
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Set, Tuple

    import cffi

__all__ = [
    "COMMAND_TABLE",
    "Command",
    "BY_NUMBER",
    "COMMANDS",
    "CMD_BASE",
    "IOC_NR",
    "register",
    "unregister",
    "check_layouts",
    "cdefs_path",
    "load_cdefs",
]

_HERE = os.path.dirname(os.path.abspath(__file__))


def cdefs_path(filename: str) -> str:
    """Where a header of ``cdefs/`` is: inside the installed package, or at
    the top of a source checkout (editable installs, running from the tree)."""
    for candidate in (os.path.join(_HERE, "cdefs", filename), os.path.join(os.path.dirname(_HERE), "cdefs", filename)):
        if os.path.isfile(candidate):
            return candidate
    raise ImportError(f"liveupdate: C declarations {filename!r} not found next to the package")


def _read(filename: str) -> str:
    with open(cdefs_path(filename), encoding="utf-8") as f:
        return f.read()


def constants(text: str) -> "Dict[str, int]":
    """``#define NAME NUMBER`` lines and ``NAME = NUMBER,`` enum members of
    a cdefs header, by name (what cffi's ``lib.NAME`` gives)."""
    found: "Dict[str, int]" = {}
    for line in text.splitlines():
        words = line.replace("=", " = ").replace(",", " ").split()
        if len(words) == 3 and words[0] == "#define" or len(words) == 3 and words[1] == "=":
            name, value = (words[1], words[2]) if words[0] == "#define" else (words[0], words[2])
            try:
                found[name] = int(value, 0)
            except ValueError:
                pass
    return found


_C = constants(_read("liveupdate.h"))

IOCTL_TYPE: int = _C["LIVEUPDATE_IOCTL_TYPE"]
NAME_LENGTH: int = _C["LIVEUPDATE_SESSION_NAME_LENGTH"]
#: Longest name a caller can pass: one byte is the terminating NUL.
NAME_MAX: int = NAME_LENGTH - 1
TOKEN_MAX: int = 2**64 - 1


def _io(nr: int) -> int:
    # _IO(): direction "none" and size 0 in the upper bits, so only the type
    # and the command number remain. The kernel checks the whole number.
    return (IOCTL_TYPE << 8) | nr


# Native byte order, standard sizes, no implicit padding: the offsets are
# spelled out (LAYOUTS) and checked against cffi by check_layouts().
CREATE_SESSION = struct.Struct(f"=Ii{NAME_LENGTH}s")
RETRIEVE_SESSION = CREATE_SESSION
PRESERVE_FD = struct.Struct("=IiQ")
RETRIEVE_FD = PRESERVE_FD
FINISH = struct.Struct("=II")
GET_NAME = struct.Struct(f"=II{NAME_LENGTH}s")


#: The first command number of each target (the kernel's table index is
#: the command's _IOC_NR minus it).
CMD_BASE = {"device": _C["LIVEUPDATE_CMD_BASE"], "session": _C["LIVEUPDATE_CMD_SESSION_BASE"]}


def IOC_NR(cmd: int) -> int:
    """_IOC_NR(): the command number in the low byte of a request."""
    return cmd & 0xFF


class Command:
    """One row of the ioctl contract (see the module).

    ``nr`` is the command number, or the name of the cdefs constant that
    holds it; ``last`` the last field the kernel needs (the minimum size is
    where it ends); ``fd_result`` and ``fd_arg`` the offsets of a new fd in
    the result and of the caller's fd in the argument, or None;
    ``unknown_if_einval`` that EINVAL from it, with the arguments the
    library sends, can only mean a kernel without the command (it refuses
    a number beyond its table with EINVAL): see errors.wrap_ioctl."""

    __slots__ = ("name", "nr", "number", "ctype", "packer", "fields", "min_size", "target", "states",
                 "fd_result", "fd_arg", "unknown_if_einval")

    def __init__(self, name: str, nr: "int | str", ctype: str, packer: struct.Struct,
                 fields: "Tuple[Tuple[str, int, int], ...]", last: str, target: str,
                 states: "Tuple[str, ...]", fd_result: "int | None", fd_arg: "int | None" = None,
                 unknown_if_einval: bool = False) -> None:
        if target not in CMD_BASE:
            raise ValueError(f"{name}: target must be 'device' or 'session', not {target!r}")
        self.name = name
        self.nr = _C[nr] if isinstance(nr, str) else nr
        self.number = _io(self.nr)
        self.ctype = ctype
        self.packer = packer
        #: (field, offset, size) in order; the packer's layout.
        self.fields = fields
        offset, size = next((o, s) for f, o, s in fields if f == last)
        self.min_size = offset + size
        #: "device" (/dev/liveupdate) or "session" (a session fd)
        self.target = target
        #: the kinds of session that accept it: ("outgoing",), ("incoming",) or both
        self.states = states
        #: offset of the new fd in the result, or None when there is none
        self.fd_result = fd_result
        #: offset of an fd of the caller's in the argument, or None
        self.fd_arg = fd_arg
        self.unknown_if_einval = unknown_if_einval

    @property
    def size(self) -> int:
        return self.packer.size

    @property
    def index(self) -> int:
        """The row's place in its target's table (nr minus the target's base)."""
        return self.nr - CMD_BASE[self.target]

    def __repr__(self) -> str:
        return f"<Command {self.name} {self.number:#x}>"


_SESSION_FIELDS = (("size", 0, 4), ("fd", 4, 4), ("name", 8, NAME_LENGTH))
_FD_TOKEN_FIELDS = (("size", 0, 4), ("fd", 4, 4), ("token", 8, 8))
_ANY = ("outgoing", "incoming")

#: The contract, a row per ioctl, in the uapi's order.
COMMAND_TABLE: "Tuple[Command, ...]" = (
    Command("LIVEUPDATE_IOCTL_CREATE_SESSION", "LIVEUPDATE_CMD_CREATE_SESSION",
            "struct liveupdate_ioctl_create_session", CREATE_SESSION, _SESSION_FIELDS, "name", "device", (), 4),
    Command("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "LIVEUPDATE_CMD_RETRIEVE_SESSION",
            "struct liveupdate_ioctl_retrieve_session", RETRIEVE_SESSION, _SESSION_FIELDS, "name", "device", (), 4),
    Command("LIVEUPDATE_SESSION_PRESERVE_FD", "LIVEUPDATE_CMD_SESSION_PRESERVE_FD",
            "struct liveupdate_session_preserve_fd", PRESERVE_FD, _FD_TOKEN_FIELDS, "token", "session",
            ("outgoing",), None, fd_arg=4),
    Command("LIVEUPDATE_SESSION_RETRIEVE_FD", "LIVEUPDATE_CMD_SESSION_RETRIEVE_FD",
            "struct liveupdate_session_retrieve_fd", RETRIEVE_FD, _FD_TOKEN_FIELDS, "token", "session",
            ("incoming",), 4),
    Command("LIVEUPDATE_SESSION_FINISH", "LIVEUPDATE_CMD_SESSION_FINISH",
            "struct liveupdate_session_finish", FINISH, (("size", 0, 4), ("reserved", 4, 4)), "reserved",
            "session", ("incoming",), None),
    Command("LIVEUPDATE_SESSION_GET_NAME", "LIVEUPDATE_CMD_SESSION_GET_NAME",
            "struct liveupdate_session_get_name", GET_NAME,
            (("size", 0, 4), ("reserved", 4, 4), ("name", 8, NAME_LENGTH)), "name", "session", _ANY, None,
            # Any session, reserved 0, the full size: EINVAL is only "no such command".
            unknown_if_einval=True),
)

#: ioctl number -> its row.
BY_NUMBER: "Dict[int, Command]" = {command.number: command for command in COMMAND_TABLE}
#: Every command's number, by the name the uapi gives it.
COMMANDS: "Dict[str, int]" = {command.name: command.number for command in COMMAND_TABLE}

IOCTL_CREATE_SESSION = COMMANDS["LIVEUPDATE_IOCTL_CREATE_SESSION"]
IOCTL_RETRIEVE_SESSION = COMMANDS["LIVEUPDATE_IOCTL_RETRIEVE_SESSION"]
SESSION_PRESERVE_FD = COMMANDS["LIVEUPDATE_SESSION_PRESERVE_FD"]
SESSION_RETRIEVE_FD = COMMANDS["LIVEUPDATE_SESSION_RETRIEVE_FD"]
SESSION_FINISH = COMMANDS["LIVEUPDATE_SESSION_FINISH"]
SESSION_GET_NAME = COMMANDS["LIVEUPDATE_SESSION_GET_NAME"]


def register(command: Command) -> None:
    """Add a row to the contract at run time: a command of a development
    kernel, or a test's. Every reader (the emulator's tables, the service's
    fd rules) sees it from the next call on. Raises ValueError if its number
    or name is taken."""
    global COMMAND_TABLE
    if command.number in BY_NUMBER or command.name in COMMANDS:
        raise ValueError(f"{command!r}: its number or name is in the table already")
    COMMAND_TABLE = COMMAND_TABLE + (command,)
    BY_NUMBER[command.number] = command
    COMMANDS[command.name] = command.number


def unregister(command: Command) -> None:
    """Take a row added with :func:`register` out again."""
    global COMMAND_TABLE
    if BY_NUMBER.get(command.number) is not command:
        raise ValueError(f"{command!r} is not in the table")
    COMMAND_TABLE = tuple(c for c in COMMAND_TABLE if c is not command)
    del BY_NUMBER[command.number]
    del COMMANDS[command.name]


#: struct name -> (packer, [(field, offset)]) for the layout check.
LAYOUTS: "Dict[str, Tuple[struct.Struct, list[Tuple[str, int]]]]" = {
    c.ctype: (c.packer, [(f, o) for f, o, _ in c.fields]) for c in COMMAND_TABLE}


# -- cffi, for what needs it ---------------------------------------------------

_ffi: "Optional[cffi.FFI]" = None
_loaded: "Set[str]" = set()


def _cffi() -> "cffi.FFI":
    """The project's one cffi layer, made on first use, with the layout
    check run against it."""
    global _ffi
    if _ffi is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_read("liveupdate.h"))
        _loaded.add("liveupdate.h")
        check_layouts(ffi)
        _ffi = ffi
    return _ffi


def load_cdefs(filename: str) -> None:
    """Add the declarations of another ``cdefs/`` header to :data:`ffi`.

    Used by the modules that need more of the kernel's ABI (kexec, reboot)
    so that the whole project shares one cffi layer."""
    ffi = _cffi()
    if filename not in _loaded:
        ffi.cdef(_read(filename))
        _loaded.add(filename)


def check_layouts(ffi: "Optional[cffi.FFI]" = None) -> None:
    """Check every packer, offset and constant of this module against
    cffi's parse of the header. Raises ImportError on a mismatch."""
    ffi = ffi or _cffi()
    lib: Any = ffi.dlopen(None)  # its attributes are the header's constants
    for name, value in _C.items():
        if getattr(lib, name) != value:
            raise ImportError(f"liveupdate: {name} is {getattr(lib, name)} in cdefs, {value} as read here")
    for ctype, (packer, fields) in LAYOUTS.items():
        if ffi.sizeof(ctype) != packer.size:
            raise ImportError(f"liveupdate: {ctype} is {ffi.sizeof(ctype)} bytes in cdefs, {packer.size} in the packer")
        for field, offset in fields:
            if ffi.offsetof(ctype, field) != offset:
                raise ImportError(f"liveupdate: {ctype}.{field} is at {ffi.offsetof(ctype, field)}, packer says {offset}")


def __getattr__(name: str) -> "cffi.FFI":
    # ``_abi.ffi`` for the modules (and tests) that use cffi: made lazily.
    if name == "ffi":
        return _cffi()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
