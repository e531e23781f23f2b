"""The uapi as data: struct layouts, ioctl numbers and packers (private).

The C declarations live in ``cdefs/liveupdate.h`` and are parsed by cffi in
ABI mode, so nothing is compiled at install time. The hot path packs its
arguments with :mod:`struct` (cheaper per call than filling cffi objects);
the formats below are checked against cffi's view of the same structs at
import, so the two can never drift apart silently.
"""
from __future__ import annotations

import struct
from pathlib import Path

import cffi

_HERE = Path(__file__).resolve().parent


def cdefs_path(filename: str) -> Path:
    """Where a header of ``cdefs/`` is: inside the installed package, or at
    the top of a source checkout (editable installs, running from the tree)."""
    for candidate in (_HERE / "cdefs" / filename, _HERE.parent / "cdefs" / filename):
        if candidate.is_file():
            return candidate
    raise ImportError(f"liveupdate: C declarations {filename!r} not found next to the package")


ffi = cffi.FFI()
ffi.cdef(cdefs_path("liveupdate.h").read_text(encoding="utf-8"))


def load_cdefs(filename: str) -> None:
    """Add the declarations of another ``cdefs/`` header to :data:`ffi`.

    Used by the modules that need more of the kernel's ABI (kexec, reboot)
    so that the whole project shares one cffi layer."""
    if filename not in _loaded:
        ffi.cdef(cdefs_path(filename).read_text(encoding="utf-8"))
        _loaded.add(filename)


_loaded = {"liveupdate.h"}

_lib = ffi.dlopen(None)

IOCTL_TYPE: int = _lib.LIVEUPDATE_IOCTL_TYPE
NAME_LENGTH: int = _lib.LIVEUPDATE_SESSION_NAME_LENGTH
#: Longest name a caller can pass: one byte is the terminating NUL.
NAME_MAX: int = NAME_LENGTH - 1
TOKEN_MAX: int = 2**64 - 1


def _io(nr: int) -> int:
    # _IO(): direction "none" and size 0 in the upper bits, so only the type
    # and the command number remain. The kernel checks the whole number.
    return (IOCTL_TYPE << 8) | nr


IOCTL_CREATE_SESSION = _io(_lib.LIVEUPDATE_CMD_CREATE_SESSION)
IOCTL_RETRIEVE_SESSION = _io(_lib.LIVEUPDATE_CMD_RETRIEVE_SESSION)
SESSION_PRESERVE_FD = _io(_lib.LIVEUPDATE_CMD_SESSION_PRESERVE_FD)
SESSION_RETRIEVE_FD = _io(_lib.LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)
SESSION_FINISH = _io(_lib.LIVEUPDATE_CMD_SESSION_FINISH)
SESSION_GET_NAME = _io(_lib.LIVEUPDATE_CMD_SESSION_GET_NAME)

#: Every command, by the name the uapi gives it.
COMMANDS = {
    "LIVEUPDATE_IOCTL_CREATE_SESSION": IOCTL_CREATE_SESSION,
    "LIVEUPDATE_IOCTL_RETRIEVE_SESSION": IOCTL_RETRIEVE_SESSION,
    "LIVEUPDATE_SESSION_PRESERVE_FD": SESSION_PRESERVE_FD,
    "LIVEUPDATE_SESSION_RETRIEVE_FD": SESSION_RETRIEVE_FD,
    "LIVEUPDATE_SESSION_FINISH": SESSION_FINISH,
    "LIVEUPDATE_SESSION_GET_NAME": SESSION_GET_NAME,
}

# Native byte order, standard sizes, no implicit padding: the offsets are
# spelled out and verified against cffi below.
CREATE_SESSION = struct.Struct(f"=Ii{NAME_LENGTH}s")
RETRIEVE_SESSION = CREATE_SESSION
PRESERVE_FD = struct.Struct("=IiQ")
RETRIEVE_FD = PRESERVE_FD
FINISH = struct.Struct("=II")
GET_NAME = struct.Struct(f"=II{NAME_LENGTH}s")

#: struct name -> (packer, [(field, offset)]) for the layout self-check.
LAYOUTS = {
    "struct liveupdate_ioctl_create_session": (CREATE_SESSION, [("size", 0), ("fd", 4), ("name", 8)]),
    "struct liveupdate_ioctl_retrieve_session": (RETRIEVE_SESSION, [("size", 0), ("fd", 4), ("name", 8)]),
    "struct liveupdate_session_preserve_fd": (PRESERVE_FD, [("size", 0), ("fd", 4), ("token", 8)]),
    "struct liveupdate_session_retrieve_fd": (RETRIEVE_FD, [("size", 0), ("fd", 4), ("token", 8)]),
    "struct liveupdate_session_finish": (FINISH, [("size", 0), ("reserved", 4)]),
    "struct liveupdate_session_get_name": (GET_NAME, [("size", 0), ("reserved", 4), ("name", 8)]),
}


def _check_layouts() -> None:
    for ctype, (packer, fields) in LAYOUTS.items():
        if ffi.sizeof(ctype) != packer.size:
            raise ImportError(f"liveupdate: {ctype} is {ffi.sizeof(ctype)} bytes in cdefs, {packer.size} in the packer")
        for field, offset in fields:
            if ffi.offsetof(ctype, field) != offset:
                raise ImportError(f"liveupdate: {ctype}.{field} is at {ffi.offsetof(ctype, field)}, packer says {offset}")


_check_layouts()
