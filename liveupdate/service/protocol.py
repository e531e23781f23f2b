"""The emulator service's wire protocol (private to :mod:`liveupdate.service`).

Transport: ``AF_UNIX`` ``SOCK_SEQPACKET``. Each message is one datagram, so a
message is never split or merged and the receiver never waits for the rest
of one: a client that stops half-way cannot stall the service.

Every message starts with a fixed header::

    offset size field
         0    2 magic    b"LU"
         2    1 version  PROTOCOL_VERSION
         3    1 op       OP_* (a reply echoes its request's op)
         4    2 flags    FLAG_* (which fds travel with the message)
         6    2 reserved 0
         8    4 seq      chosen by the client, echoed by the reply
        12    4 value    request: the ioctl command; reply: 0 or an errno
        16    4 length   bytes of payload that follow the header

and exactly ``length`` bytes of payload (the ioctl argument struct, the
device path, a result or an error's detail text). The header is native
endian like the ioctl structs it carries: both ends run on one machine.

Messages from the service carry ``FLAG_REPLY``. fds travel as
``SCM_RIGHTS``. A request may carry a *reply channel* (flag
``FLAG_REPLY_CHANNEL``, first fd): a socket on which the service sends the
reply instead of the connection the request came in on. Clients use one
whenever the connection may be shared with another process (after fork,
after passing the fd), so that each reply reaches the process that asked.
"""
from __future__ import annotations

import array
import errno
import socket
import struct
from typing import List, NamedTuple, Sequence, Tuple

MAGIC = b"LU"
PROTOCOL_VERSION = 1

HEADER = struct.Struct("=2sBBHHIII")

#: Open the emulated device; on success this connection *is* the device fd.
OP_OPEN_DEVICE = 1
#: Run an ioctl on the handle this connection stands for.
OP_IOCTL = 2
#: Run the emulated reboot: serialize, invalidate every handle, boot again.
OP_KEXEC = 3
#: Describe the service and its kernel (JSON payload), for tools and tests.
OP_STATUS = 4
#: Sent unasked by the service before it closes a connection it refuses.
OP_REFUSED = 255

FLAG_REPLY_CHANNEL = 1
FLAG_FD = 2
#: Set on every message from the service. A reply fed back to the service
#: (through a session socket given as someone's reply channel) is dropped,
#: never answered, so no message can bounce between two of its sockets.
FLAG_REPLY = 4
FLAGS = FLAG_REPLY_CHANNEL | FLAG_FD | FLAG_REPLY

#: Largest payload. fcntl.ioctl() accepts at most 1024 bytes of argument;
#: the rest is room for paths and JSON.
MAX_PAYLOAD = 4096
MAX_MESSAGE = HEADER.size + MAX_PAYLOAD
#: At most a reply channel and one fd of payload; anything beyond is refused.
MAX_FDS = 2
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

#: The abstract socket name prefix that marks a session handle's socket.
SESSION_NAME_PREFIX = b"\0liveupdate-emulator-session:"


class Message(NamedTuple):
    op: int
    flags: int
    seq: int
    value: int
    payload: bytes


def encode(op: int, seq: int, value: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    """One message, header and payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, op, flags, 0, seq & 0xFFFFFFFF, value & 0xFFFFFFFF, len(payload)) + payload


class ProtocolError(Exception):
    """A message that does not follow this protocol; ``errno`` says how to
    answer it (EPROTO for garbage, EPROTONOSUPPORT for another version,
    EMSGSIZE for an oversized one)."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


def decode(data: bytes, truncated: bool = False) -> Message:
    """Parse one received datagram; ProtocolError if it is not one of ours."""
    if truncated:
        raise ProtocolError(errno.EMSGSIZE, f"message larger than {MAX_MESSAGE} bytes")
    if len(data) < HEADER.size:
        raise ProtocolError(errno.EPROTO, f"message of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, op, flags, reserved, seq, value, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(errno.EPROTO, f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(errno.EPROTONOSUPPORT, f"protocol version {version}, this end speaks {PROTOCOL_VERSION}")
    if reserved or flags & ~FLAGS:
        raise ProtocolError(errno.EPROTO, "reserved bits set")
    if length != len(data) - HEADER.size:
        raise ProtocolError(errno.EPROTO, f"length field says {length} bytes of payload, {len(data) - HEADER.size} arrived")
    return Message(op, flags, seq, value, bytes(data[HEADER.size :]))


def fds_message(fds: Sequence[int]) -> List[Tuple[int, int, bytes]]:
    """The ancillary data that sends ``fds`` (empty list for none)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def received_fds(ancdata: Sequence[Tuple[int, int, bytes]]) -> List[int]:
    """Every fd that arrived with a message, whatever else came along.

    The caller owns them all and must close those it does not keep: a
    hostile peer can attach fds to any message."""
    fds: List[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds
