"""One request as the relay sees it: what arrived, what the ioctl argument
becomes on the way in and out, and what it costs.

The struct of a preserve names the client's fd number; the file itself came
with SCM_RIGHTS, so the relay puts its own fd number in and the client's
back in the result. A create or retrieve of a session, and a retrieve of a
file, return a new fd of the emulator's in the struct: the relay hands the
client its own fd for it instead (the fd rule is the command table's,
:data:`liveupdate._abi.COMMAND_TABLE`).
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import List, NamedTuple, Optional, Tuple

from .. import _abi
from . import protocol as P
from .budget import held_bytes, held_for_size
from .connection import Connection

__all__ = ["Request", "parse", "fd_argument", "relay_argument", "session_of", "token_of", "fd_result",
           "preserve_cost", "LONG_CALL_BYTES"]

_FD_FIELD = struct.Struct("=i")
_U32 = struct.Struct("=I")
#: memfd_pin_folios() counts folios in an unsigned int (memfd_luo.py).
_MAX_FOLIOS = 0xFFFFFFFF
_TOKEN_FIELD = struct.Struct("=Q")

#: A call that makes the kernel hold or let go of this much (the pages of
#: 256 MiB of memfds: a preserve, retrieve, finish or release of big
#: memfds) runs on the worker thread, not the event loop. The kernel's work
#: for a memfd grows with its pages, as the emulator's memory for it does.
LONG_CALL_BYTES = held_for_size(256 << 20)


class Request(NamedTuple):
    """A request being answered. ``fds`` (everything that came with it) are
    the service's to close once the reply is sent."""

    conn: Connection
    msg: P.Message
    channel: Optional[int]  # a reply channel the client supplied
    fd_in: Optional[int]  # the fd of the payload (a file to preserve)
    fds: List[int]


def parse(conn: Connection, data: bytes, flags: int, fds: List[int]) -> Request:
    """Check one datagram. Raises :class:`.protocol.ProtocolError`."""
    msg = P.decode(data, truncated=bool(flags & socket.MSG_TRUNC))
    if flags & socket.MSG_CTRUNC:
        raise P.ProtocolError(errno.EPROTO, f"more than {P.MAX_FDS} fds attached")
    wanted = bin(msg.flags & (P.FLAG_REPLY_CHANNEL | P.FLAG_FD)).count("1")
    if len(fds) != wanted and not msg.flags & P.FLAG_REPLY:
        raise P.ProtocolError(errno.EPROTO, f"flags announce {wanted} fds, {len(fds)} arrived")
    channel = fds[0] if msg.flags & P.FLAG_REPLY_CHANNEL and fds else None
    fd_in = fds[-1] if msg.flags & P.FLAG_FD and fds else None
    return Request(conn, msg, channel, fd_in, fds)


def sequence_of(data: bytes) -> int:
    """The seq field of a datagram too broken to decode (0 if none)."""
    return int(P.HEADER.unpack_from(data)[5]) if len(data) >= P.HEADER.size else 0


def fd_argument(cmd: int) -> Optional[int]:
    """The offset of the caller's fd in the argument of ``cmd`` (the command
    table's fd_arg), None if it takes none."""
    command = _abi.BY_NUMBER.get(cmd)
    return None if command is None else command.fd_arg


def relay_argument(arg: bytes, offset: int, fd_in: Optional[int]) -> Tuple[bytes, bytes]:
    """The struct with the relay's fd for the file in it at ``offset`` (or
    -1, for an fd the client could not send, which this process's kernel
    then judges bad exactly as the client's would have), and the client's
    fd field to put back in the result."""
    if len(arg) < offset + 4:
        return arg, b""
    fd = _FD_FIELD.pack(-1 if fd_in is None else fd_in)
    return arg[:offset] + fd + arg[offset + 4:], arg[offset:offset + 4]


def kernel_refuses_size(cmd: int, arg: bytes) -> bool:
    """True when the kernel refuses the struct before it reserves or pins
    anything (no size field: EFAULT; a size below the struct's last field:
    EINVAL), so that a budget is not what answers it."""
    command = _abi.BY_NUMBER.get(cmd)
    if command is None or len(arg) < 4:
        return True
    return int(_U32.unpack_from(arg)[0]) < command.min_size


def token_of(arg: bytes) -> Optional[int]:
    """The token of a preserve or retrieve-fd struct (None if too short)."""
    return _TOKEN_FIELD.unpack_from(arg, 8)[0] if len(arg) >= 16 else None


def session_of(cmd: int, arg: bytes) -> Tuple[str, bytes]:
    """The session a successful create or retrieve made: its direction and
    its name as the kernel keeps it (the name field up to its NUL)."""
    field = arg[8 : 8 + _abi.NAME_LENGTH]
    nul = field.find(b"\0")
    name = field[:nul] if nul >= 0 else field
    return ("outgoing" if cmd == _abi.IOCTL_CREATE_SESSION else "incoming"), name


def fd_result(cmd: int) -> Optional[int]:
    """The offset of the new fd in the result of ``cmd``, None if it has none."""
    command = _abi.BY_NUMBER.get(cmd)
    return None if command is None else command.fd_result


def result_fd(out: bytes, offset: int) -> int:
    return int(_FD_FIELD.unpack_from(out, offset)[0])


def preserve_cost(fd_in: Optional[int]) -> int:
    """The memory a preserve of ``fd_in`` would make the emulator hold:
    :func:`.budget.held_bytes` for a file the memfd handler takes (an
    unlinked regular file), nothing for one the kernel will refuse (not a
    memfd, more pages than a folio count holds), so that the kernel's own
    errno is the answer."""
    if fd_in is None:
        return 0
    try:
        st = os.fstat(fd_in)
    except OSError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
        return 0
    if -(-st.st_size // 4096) > _MAX_FOLIOS:
        return 0  # the kernel refuses it first (EFBIG): nothing is held
    return held_bytes(st)
