"""One client connection of the emulator service, and the socket calls on it.

A connection stands for one fd of the client: a fresh connection to the
listener (CONTROL) becomes the device fd when it opens the device (DEVICE);
every session the client gets is the client's end of a socket pair whose
other end is a SESSION connection here. Sends and receives never block: a
client that stops reading holds up only itself (its replies wait in
:attr:`Connection.outbox`).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import FrozenSet, List, Optional, Sequence, Tuple

from . import protocol as P
from .budget import FDS_PER_CONNECTION, Account, Ledger

log = logging.getLogger("liveupdate.service")

__all__ = ["Connection", "CONTROL", "DEVICE", "SESSION", "admit", "peer_credentials", "refuse", "close_all",
           "send_on_channel", "SEND_FLAGS", "RECV_FLAGS", "BATCH"]

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

    def send(self, data: bytes, fds: List[int], close_after: List[int]) -> Optional[bool]:
        """Send now if the socket takes it (True), else queue it (False);
        None when the connection is dead (the reply is dropped with it).
        ``close_after`` are closed once sent or dropped."""
        try:
            self.sock.sendmsg([data], P.fds_message(fds), SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            self.outbox.append((data, fds, close_after))
            return False
        except OSError:
            close_all(close_after)
            return None
        close_all(close_after)
        return True

    def flush(self) -> Optional[bool]:
        """Send what waits: True when all is sent, False when the socket is
        full again, None when the connection is dead."""
        while self.outbox:
            data, fds, close_after = self.outbox.pop(0)
            sent = self.send(data, fds, close_after)
            if sent is None:
                return None
            if not sent:
                # send() queued it at the end; put it back in front.
                self.outbox.insert(0, self.outbox.pop())
                return False
        return True


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


def send_on_channel(channel: int, data: bytes, fds: List[int]) -> None:
    """Send a reply on a channel the client supplied: one reply, never
    waited for. If it is not a usable socket the reply is lost, and so are
    any fds in it (a session sent that way is released on its EOF)."""
    try:
        sock = socket.socket(fileno=channel)  # probes: ENOTSOCK for a non-socket
    except OSError as exc:
        log.info("reply channel unusable: %s", exc)
        return
    try:
        sock.sendmsg([data], P.fds_message(fds), SEND_FLAGS)
    except OSError as exc:
        log.info("reply channel unusable: %s", exc)
    finally:
        sock.detach()  # the caller closes the channel fd


def admit(sock: socket.socket, allowed_uids: FrozenSet[int], ledger: Ledger, allowed_text: str) -> Optional[Connection]:
    """A new connection from the listener, or None when it is refused (a
    uid not served: EACCES; a client or the service out of fds: EMFILE,
    ENFILE), after telling the client why."""
    try:
        sock.setblocking(False)
        peer = peer_credentials(sock)
    except OSError as exc:
        log.warning("no credentials for a new connection: %s", exc)
        sock.close()
        return None
    if peer[1] not in allowed_uids:
        log.warning("refused pid %d uid %d: only uids %s are served", peer[0], peer[1], sorted(allowed_uids))
        refuse(sock, errno.EACCES, f"uid {peer[1]} may not use this emulator service (it serves {allowed_text})")
        return None
    account = ledger.account(peer[0], peer[1])
    try:
        ledger.charge(account, fds=FDS_PER_CONNECTION, what="connect")
    except OSError as exc:
        log.warning("refused a connection of pid %d: %s", peer[0], exc.strerror)
        refuse(sock, exc.errno or errno.EMFILE, exc.strerror or str(exc))
        return None
    conn = Connection(sock, CONTROL, account, peer)
    conn.fds = FDS_PER_CONNECTION
    return conn
