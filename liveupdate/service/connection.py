"""One client connection of the emulator service, and the socket calls on it.

A connection stands for one fd of the client: a fresh connection to the
listener (CONTROL) becomes the device fd when it opens the device (DEVICE);
every session the client gets is the client's end of a socket pair whose
other end is a SESSION connection here. Sends and receives never block: a
client that stops reading holds up only itself (its replies wait in
:attr:`Connection.outbox`).
"""
from __future__ import annotations

import os
import socket
import struct
from typing import List, Optional, Sequence, Tuple

from . import protocol as P
from .budget import Account

__all__ = ["Connection", "CONTROL", "DEVICE", "SESSION", "peer_credentials", "refuse", "close_all",
           "SEND_FLAGS", "RECV_FLAGS"]

CONTROL, DEVICE, SESSION = "control", "device", "session"

_PEERCRED = struct.Struct("3i")
SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
RECV_FLAGS = socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
#: Messages taken from one connection per wake-up, so that a flooding client
#: shares the loop with the others.
BATCH = 16

#: A reply waiting for the client: (bytes, fds to send, fds to close once sent).
Outgoing = Tuple[bytes, List[int], List[int]]


class Connection:
    """What the service knows of one connection."""

    __slots__ = ("sock", "kind", "handle", "boot", "outbox", "peer", "name", "account", "fds", "paused")

    def __init__(self, sock: socket.socket, kind: str, account: Account,
                 peer: Tuple[int, int, int] = (0, 0, 0)) -> None:
        self.sock = sock
        self.kind = kind
        self.handle = -1  # the emulator's fd this connection stands for
        self.boot = -1  # which boot of the kernel the handle belongs to
        self.outbox: List[Outgoing] = []
        self.peer = peer  # (pid, uid, gid) of the process that connected
        #: For a session: ("outgoing" or "incoming", its name), which the
        #: ledger's charges for its files are filed under.
        self.name: Optional[Tuple[str, bytes]] = None
        #: Who pays for what this connection holds, and how many fds it holds.
        self.account = account
        self.fds = 0
        #: True while a request of this connection waits for the kernel:
        #: the loop reads nothing more from it until that one is answered.
        self.paused = False

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0


def peer_credentials(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end. Raises OSError."""
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def refuse(sock: socket.socket, err: int, detail: str) -> None:
    """Tell the client why (OP_REFUSED with ``err``) and close ``sock``."""
    try:
        sock.sendmsg([P.encode(P.OP_REFUSED, 0, err, detail.encode()[: P.MAX_PAYLOAD], P.FLAG_REPLY)], [],
                     SEND_FLAGS)
        # Closing with requests unread would make the client's next
        # receive fail with ECONNRESET before it sees why: read them.
        for _ in range(BATCH):
            _, anc, _, _ = sock.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, RECV_FLAGS)
            close_all(P.received_fds(anc))
    except OSError:
        pass
    sock.close()


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
