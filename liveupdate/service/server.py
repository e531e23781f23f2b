"""The emulator service: one emulated kernel, many client processes.

The service is a relay. The emulated kernel runs in this process and its
port works on real fds of this process; each client connection stands for
one of those fds (:mod:`.connection`):

* a connection to the listening socket that opened the device *is* the
  client's device fd (EOF on it releases the device, as closing the real
  one does, so exclusivity spans processes);
* every session gets its own socket pair: the service keeps one end tied to
  the emulator's session fd and hands the other to the client as its
  session fd. The kernel releases a session when its last fd goes; here the
  service sees EOF when the last copy of the client end is closed, in
  whatever processes it travelled to, and releases the emulator's session;
* preserved fds arrive with SCM_RIGHTS, retrieved fds leave the same way.

One event loop, non-blocking sockets, one datagram per message: a client
that stops mid-request, floods, or never reads its replies holds up only
itself. Kernel calls that take long (a big preserve, a kexec) run on a
worker thread (:mod:`.worker`) while the loop goes on serving; requests
that need the kernel while it is busy wait in arrival order. What each
client may make the service hold is budgeted (:mod:`.budget`).
"""
from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import signal
import socket
import traceback
from typing import Any, Dict, List, Optional, Sequence

from . import protocol as P
from . import requests as R
from .budget import Ledger, Limits, default_limits
from .connection import (BATCH, CONTROL, DEVICE, RECV_FLAGS, SESSION, Connection, admit, close_all, refuse,
                         send_on_channel)
from .relay import Relay
from .scheduler import KernelQueue

__all__ = ["Server", "ALLOWED_BY_DEFAULT"]

log = logging.getLogger("liveupdate.service")

_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR

ALLOWED_BY_DEFAULT = "the service's own uid and root"


class Server(Relay):
    """Serve ``kernel`` (see :class:`liveupdate.service.kernel.Kernel`) on
    the AF_UNIX socket ``listener`` (bound and listening).

    Only peers whose uid is in ``allowed_uids`` are served; others get an
    EACCES refusal and a closed connection. ``limits``: the budgets
    (:func:`.budget.default_limits` when None)."""

    def __init__(self, kernel: Any, listener: socket.socket, allowed_uids: Sequence[int],
                 limits: Optional[Limits] = None) -> None:
        self.kernel = kernel
        self.listener = listener
        self.listener.setblocking(False)
        self.allowed_uids = frozenset(allowed_uids)
        self.ledger = Ledger(limits or default_limits())
        self.instance = os.urandom(6).hex()
        self._sessions_made = 0
        self._conns: Dict[int, Connection] = {}
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        # An fd kept in reserve: when the table is full, closing it lets the
        # service accept and drop the excess connection instead of spinning
        # on a listener that stays readable.
        self._reserve: Optional[int] = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # The emulated kernel's lock (None for a kernel without one): the
        # loop calls the kernel itself only when it can take it at once.
        self._queue = KernelQueue(getattr(kernel.port, "lock", None), self._wake_w, self._pause, self._resume)
        self._stopping = False
        self._reaping = False
        self.exit_code = 0

    # -- life cycle ---------------------------------------------------------

    def stop(self, code: int = 0) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stopping = True
        self.exit_code = code
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stop())

    def serve_forever(self) -> int:
        """Run until :meth:`stop`; returns the exit code."""
        while not self._stopping:
            for key, mask in self._sel.select():
                if self._stopping:
                    break
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    self._queue.woken(self._wake_r)
                else:
                    self._event(key.data, mask)
        self.close()
        return self.exit_code

    def _event(self, conn: Connection, mask: int) -> None:
        if conn.closed or conn.paused:
            return  # dropped or paused while handling an earlier event of this batch
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                self._read(conn)
        except Exception:
            # A bug of ours must cost one connection, not the service and
            # every other client's sessions.
            log.error("dropping a %s connection after an internal error:\n%s", conn.kind, traceback.format_exc())
            self._drop(conn)

    def close(self) -> None:
        """Release every handle (as every process exiting would) and the sockets."""
        self._queue.stop()
        self._queue.woken(self._wake_r)
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._queue.run_parked()
        try:
            self._sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        self._sel.close()
        for fd in (self._wake_r, self._wake_w, self._reserve):
            if fd is not None:
                os.close(fd)
        self._reserve = None

    # -- connections --------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(BATCH):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed_one()
                    return
                log.warning("accept failed: %s", exc)
                return
            conn = admit(sock, self.allowed_uids, self.ledger, ALLOWED_BY_DEFAULT)
            if conn is not None:
                self._add(conn)

    def _shed_one(self) -> None:
        if self._reserve is None:
            return
        os.close(self._reserve)
        self._reserve = None
        try:
            sock, _ = self.listener.accept()
            log.warning("fd table full: refused a connection")
            refuse(sock, errno.EMFILE, "the emulator service has no free fd")
        except OSError:
            pass
        finally:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None

    def _add(self, conn: Connection) -> None:
        self._conns[conn.sock.fileno()] = conn
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _pause(self, conn: Connection) -> None:
        """Read nothing more from ``conn`` until its request is answered."""
        if not conn.paused and not conn.closed:
            conn.paused = True
            self._sel.unregister(conn.sock)

    def _resume(self, conn: Connection) -> None:
        if conn.paused and not conn.closed:
            conn.paused = False
            events = selectors.EVENT_WRITE if conn.outbox else selectors.EVENT_READ
            self._sel.register(conn.sock, events, conn)
        conn.paused = False

    def _drop(self, conn: Connection) -> None:
        """The client's last copy is gone (or it misbehaved): release what the
        connection stood for, exactly as the kernel does on the last close."""
        fd = conn.sock.fileno()
        if fd < 0:
            return
        self._conns.pop(fd, None)
        if not conn.paused:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
        for _, _, to_close in conn.outbox:
            close_all(to_close)
        conn.outbox = []
        self.ledger.refund(conn.account, fds=conn.fds)
        conn.fds = 0
        if conn.handle < 0:
            return
        handle, boot, name, kind = conn.handle, conn.boot, conn.name, conn.kind
        conn.handle = -1

        def released(_: Any, exc: Optional[BaseException]) -> None:
            if isinstance(exc, OSError):
                log.warning("releasing %s handle %d: %s", kind, handle, exc)
            elif exc is not None:  # an emulator bug must not take the service down
                log.error("releasing %s handle %d failed: %r", kind, handle, exc)
            if name is not None and boot == self.kernel.boots:
                self.ledger.forget_session(name)  # unpreserved or finished: its files are gone

        # A release changes what later calls get (a name or file taken no
        # more): a long one runs alone, as a kexec does, so none overtakes it.
        self._queue.run(lambda: self.kernel.release(handle, boot), released,
                        exclusive=self.ledger.held(name) > R.LONG_CALL_BYTES)

    # -- reading requests ---------------------------------------------------

    def _read(self, conn: Connection) -> None:
        for _ in range(BATCH):
            if conn.outbox or conn.paused:
                return  # backpressure: read more once the client took its replies
            try:
                data, anc, flags, _ = conn.sock.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            fds = P.received_fds(anc)
            if not data:
                close_all(fds)
                self._drop(conn)  # EOF: every copy of the client's end is closed
                return
            self._request(conn, data, flags, fds)
            if conn.closed:
                return

    def _request(self, conn: Connection, data: bytes, flags: int, fds: List[int]) -> None:
        """Answer one datagram; its ``fds`` are closed once it is answered
        (whatever must outlive the request is dup'ed or handed on first)."""
        try:
            req = R.parse(conn, data, flags, fds)
        except P.ProtocolError as exc:
            log.info("bad request on %s connection: %s", conn.kind, exc)
            self._reply(conn, None, 0, R.sequence_of(data), exc.errno, str(exc).encode())
            close_all(fds)
            return
        if req.msg.flags & P.FLAG_REPLY:
            log.info("dropped a reply sent to the service on a %s connection", conn.kind)
            close_all(fds)
            return
        try:
            self._dispatch(req)
        except BaseException as exc:
            self._answer(req, None, exc)

    def _reap(self, current: Connection) -> int:
        """Finish every connection whose client end is closed everywhere:
        handle what it sent before closing, then release its handle.
        Returns how many; ``current`` (the connection being answered) is
        left for the loop, so its requests keep their order."""
        if self._reaping:
            return 0
        self._reaping = True
        try:
            poller = select.poll()
            for fd, conn in self._conns.items():
                if not conn.paused:
                    poller.register(fd, _HUNG_UP)
            dead = [self._conns[fd] for fd, events in poller.poll(0)
                    if events & _HUNG_UP and fd in self._conns and self._conns[fd] is not current]
            for conn in dead:
                self._drain(conn)
            return len(dead)
        finally:
            self._reaping = False

    def _drain(self, conn: Connection) -> None:
        # The peer is gone: its queued requests are bounded by the socket's
        # buffer, and every reply fails with EPIPE, which drops it. One that
        # waits for the kernel leaves the rest (and the drop) to the loop.
        for _ in range(100000):
            if conn.closed or conn.paused:
                return
            if conn.outbox:
                self._flush(conn)
            else:
                self._read(conn)
        self._drop(conn)

    # -- replies ------------------------------------------------------------

    def _reply(self, conn: Connection, channel: Optional[int], op: int, seq: int, err: int, payload: bytes,
               fd_out: Optional[int] = None, close_after: Sequence[int] = ()) -> None:
        flags = P.FLAG_REPLY | (P.FLAG_FD if fd_out is not None else 0)
        data = P.encode(op, seq, err, payload, flags)
        fds = [] if fd_out is None else [fd_out]
        if channel is not None or conn.closed:
            if channel is not None:
                send_on_channel(channel, data, fds)
            close_all(close_after)
            return
        if conn.outbox:
            conn.outbox.append((data, fds, list(close_after)))
            return
        sent = conn.send(data, fds, list(close_after))
        if sent is None:
            self._drop(conn)
        elif not sent and not conn.paused:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _flush(self, conn: Connection) -> None:
        done = conn.flush()
        if done is None:
            self._drop(conn)
        elif done and not conn.paused:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    # -- introspection ------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """What the service holds, for ``emulator status``, tools and tests."""
        counts: Dict[str, int] = {CONTROL: 0, DEVICE: 0, SESSION: 0, "stale": 0}
        for conn in self._conns.values():
            counts[conn.kind] += 1
            if conn.kind != CONTROL and conn.boot != self.kernel.boots:
                counts["stale"] += 1
        info = {
            "pid": os.getpid(),
            "protocol": P.PROTOCOL_VERSION,
            "connections": counts,
            "sessions_handed_out": self._sessions_made,
            "budget": self.ledger.describe(),
            "kernel_busy": self._queue.busy,
            "waiting_for_kernel": self._queue.waiting,
        }
        info.update(self.kernel.describe())
        return info

