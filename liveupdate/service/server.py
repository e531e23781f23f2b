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

import collections
import errno
import json
import logging
import os
import select
import selectors
import signal
import socket
import traceback
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from .. import _abi
from ..errors import KernelPanic
from . import protocol as P
from . import requests as R
from .budget import FDS_PER_CONNECTION, FDS_PER_DEVICE, FDS_PER_FILE, FDS_PER_SESSION, Ledger, Limits, default_limits
from .connection import (BATCH, CONTROL, DEVICE, RECV_FLAGS, SEND_FLAGS, SESSION, Connection, close_all,
                         peer_credentials, refuse)
from .worker import KernelWorker

__all__ = ["Server", "ALLOWED_BY_DEFAULT"]

log = logging.getLogger("liveupdate.service")

#: Failures that a release not yet seen could turn into another answer: a
#: name or file still taken (EEXIST, EBUSY), a session still retrieved (EINVAL).
_RELEASE_SENSITIVE = (errno.EEXIST, errno.EBUSY, errno.EINVAL)
_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR
_NEEDS_KERNEL = (P.OP_IOCTL, P.OP_OPEN_DEVICE, P.OP_KEXEC)

ALLOWED_BY_DEFAULT = "the service's own uid and root"

Done = Callable[[Any, Optional[BaseException]], None]


class Server:
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
        self._worker = KernelWorker(self._wake_w)
        # The emulated kernel's lock (None for a kernel without one): the
        # loop runs a kernel call itself only when it can take it at once.
        self._lock = getattr(kernel.port, "lock", None)
        #: Kernel work that found the kernel busy, in arrival order.
        self._parked: Deque[Callable[[], None]] = collections.deque()
        self._exclusive = False  # a kexec runs: nothing else may touch the kernel
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
                    self._woken()
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
        self._worker.stop()
        self._woken()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._run_parked()
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
            try:
                sock.setblocking(False)
                peer = peer_credentials(sock)
            except OSError as exc:
                log.warning("no credentials for a new connection: %s", exc)
                sock.close()
                continue
            if peer[1] not in self.allowed_uids:
                log.warning("refused pid %d uid %d: only uids %s are served", peer[0], peer[1],
                            sorted(self.allowed_uids))
                refuse(sock, errno.EACCES, f"uid {peer[1]} may not use this emulator service "
                                           f"(it serves {ALLOWED_BY_DEFAULT})")
                continue
            account = self.ledger.account(peer[0], peer[1])
            try:
                self.ledger.charge(account, fds=FDS_PER_CONNECTION, what="connect")
            except OSError as exc:
                log.warning("refused a connection of pid %d: %s", peer[0], exc.strerror)
                refuse(sock, exc.errno or errno.EMFILE, exc.strerror or str(exc))
                continue
            conn = Connection(sock, CONTROL, account, peer)
            conn.fds = FDS_PER_CONNECTION
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

        self._kernel(lambda: self.kernel.release(handle, boot), released, long=self.ledger.held(name) > R.LONG_CALL_BYTES)

    # -- the kernel, on the loop or on the worker -----------------------------

    def _kernel(self, call: Callable[[], Any], done: Done, long: bool = False, exclusive: bool = False,
                conn: Optional[Connection] = None) -> None:
        """Run ``call()`` on the kernel, then ``done(result, exception)`` on
        the loop: at once when the kernel is free (on the worker when
        ``long``), else once it is, after what waits already. ``exclusive``
        (a kexec): nothing else runs meanwhile. ``conn`` is read no further
        until then."""
        if (self._parked or self._exclusive or (exclusive and self._worker.busy)
                or (self._lock is not None and not self._lock.acquire(blocking=False))):
            if conn is not None:
                self._pause(conn)
            self._parked.append(lambda: self._kernel(call, done, long, exclusive, conn))
            return
        try:
            if conn is not None:
                self._resume(conn)
            if long or exclusive:
                if conn is not None:
                    self._pause(conn)
                self._exclusive = exclusive
                self._worker.submit(call, lambda result, exc: self._after_worker(conn, done, result, exc))
                return
            try:
                result = call()
            except Exception as exc:
                done(None, exc)
            else:
                done(result, None)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _after_worker(self, conn: Optional[Connection], done: Done, result: Any, exc: Optional[BaseException]) -> None:
        self._exclusive = False
        if conn is not None:
            self._resume(conn)
        done(result, exc)

    def _woken(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass
        for done, result, exc in self._worker.completed():
            done(result, exc)
        self._run_parked()

    def _run_parked(self) -> None:
        waiting, self._parked = self._parked, collections.deque()
        while waiting:
            if self._parked:  # one found the kernel busy again: the rest wait behind it
                self._parked.extend(waiting)
                return
            waiting.popleft()()

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

    def _answer(self, req: R.Request, result: Optional[Tuple[bytes, Optional[int], List[int]]],
                exc: Optional[BaseException] = None) -> None:
        """Reply to ``req`` with ``result`` (payload, fd to send, fds to close
        once sent) or the errno of ``exc``; then close the request's fds."""
        conn, msg = req.conn, req.msg
        try:
            if exc is None and result is not None:
                payload, fd_out, close_after = result
                self._reply(conn, req.channel, msg.op, msg.seq, 0, payload, fd_out, close_after)
            elif isinstance(exc, OSError):
                detail = exc.strerror if exc.strerror and exc.strerror != os.strerror(exc.errno or 0) else ""
                self._reply(conn, req.channel, msg.op, msg.seq, exc.errno or errno.EIO, detail.encode()[: P.MAX_PAYLOAD])
            elif isinstance(exc, KernelPanic):
                log.critical("the emulated kernel panicked: %s", exc)
                self._reply(conn, req.channel, msg.op, msg.seq, errno.EIO, f"kernel panic: {exc}".encode()[: P.MAX_PAYLOAD])
                self.stop(70)
            elif isinstance(exc, Exception):  # an emulator bug: say so, keep serving the others
                log.error("request op=%d cmd=%#x failed:\n%s", msg.op, msg.value,
                          "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
                self._reply(conn, req.channel, msg.op, msg.seq, errno.EIO,
                            f"emulator service internal error: {exc!r}".encode()[: P.MAX_PAYLOAD])
            elif exc is not None:
                raise exc
        finally:
            close_all(req.fds)

    def _dispatch(self, req: R.Request) -> None:
        """Start answering ``req``; raises OSError with the errno to answer."""
        conn, msg = req.conn, req.msg
        if msg.op == P.OP_STATUS:
            if not self._worker.busy and not self._parked:
                self._reap(conn)
            self._answer(req, (json.dumps(self.status(), sort_keys=True).encode(), None, []))
            return
        if msg.op == P.OP_IOCTL:
            if conn.kind == CONTROL:
                raise OSError(errno.ENOTTY, "this connection holds no device or session: open the device first")
            self._ioctl(req)
            return
        if conn.kind != CONTROL:
            raise OSError(errno.EPROTO, f"op {msg.op} is only for a fresh connection to the service")
        if msg.op not in _NEEDS_KERNEL:
            raise OSError(errno.EPROTO, f"unknown op {msg.op}")
        if msg.op == P.OP_OPEN_DEVICE:
            self._kernel(lambda: self._open_device(req), lambda result, exc: self._answer(req, result, exc), conn=conn)
            return
        # Sessions whose last fd is closed are released before the reboot,
        # as the kernel released them at close: none crosses.
        self._kernel(lambda: self._reap(conn), lambda *_: None)
        self._kernel(self.kernel.kexec, lambda info, exc: self._kexec_done(req, info, exc), exclusive=True, conn=conn)

    def _kexec_done(self, req: R.Request, info: Any, exc: Optional[BaseException]) -> None:
        if exc is None:
            log.info("kexec: %s", info)
            self.ledger.kexec()
            self._answer(req, (json.dumps(info, sort_keys=True).encode(), None, []))
        else:
            self._answer(req, None, exc)

    def _open_device(self, req: R.Request) -> Tuple[bytes, Optional[int], List[int]]:
        conn = req.conn
        path = req.msg.payload.decode("utf-8", "surrogateescape")
        self.ledger.charge(conn.account, fds=FDS_PER_DEVICE, what=f"open {path}")
        try:
            try:
                handle = self.kernel.port.open_device(path)
            except OSError as exc:
                if exc.errno != errno.EBUSY or not self._reap(conn):
                    raise
                handle = self.kernel.port.open_device(path)
        except BaseException:
            self.ledger.refund(conn.account, fds=FDS_PER_DEVICE)
            raise
        conn.fds += FDS_PER_DEVICE
        conn.kind, conn.handle, conn.boot = DEVICE, handle, self.kernel.boots
        return b"", None, []

    def _ioctl(self, req: R.Request) -> None:
        conn, cmd, arg = req.conn, req.msg.value, req.msg.payload
        if conn.boot != self.kernel.boots:
            raise OSError(errno.ESTALE, f"this {conn.kind} handle belongs to the kernel before an emulated kexec "
                                        f"(boot {conn.boot}; now boot {self.kernel.boots})")
        client_fd = b""
        fd_arg = R.fd_argument(cmd)
        if fd_arg is not None:
            arg, client_fd = R.relay_argument(arg, fd_arg, req.fd_in)
        token = R.token_of(arg)
        long = False
        if conn.kind == SESSION and cmd == _abi.SESSION_PRESERVE_FD:
            long = R.preserve_cost(req.fd_in) > R.LONG_CALL_BYTES
        elif conn.kind == SESSION and cmd == _abi.SESSION_RETRIEVE_FD:
            long = self.ledger.held(conn.name, token) > R.LONG_CALL_BYTES
        elif conn.kind == SESSION and cmd == _abi.SESSION_FINISH:
            long = self.ledger.held(conn.name) > R.LONG_CALL_BYTES
        charged = [0, 0]  # fds, bytes charged to conn.account for this call

        def call() -> bytes:
            return self.kernel.port.ioctl(conn.handle, cmd, arg)

        def start() -> bytes:
            # On the kernel's turn, so that the budget sees every earlier call.
            fds, memory = 0, 0
            if conn.kind == DEVICE and cmd in (_abi.IOCTL_CREATE_SESSION, _abi.IOCTL_RETRIEVE_SESSION):
                fds = FDS_PER_SESSION
            elif conn.kind == SESSION and cmd == _abi.SESSION_PRESERVE_FD:
                fds, memory = FDS_PER_FILE, R.preserve_cost(req.fd_in)
            if fds or memory:
                self.ledger.charge(conn.account, fds, memory, what=_describe(cmd, token, client_fd))
                charged[:] = [fds, memory]
            return call()

        def done(out: Any, exc: Optional[BaseException], retried: bool = False) -> None:
            if (isinstance(exc, OSError) and exc.errno in _RELEASE_SENSITIVE and not retried
                    and self._reap(conn)):
                # The kernel releases a file at its last close, before close()
                # returns; here the EOF of a closed handle may still wait in the
                # loop. The answers such a pending release would change are
                # only these errors: release what is closed, then ask again.
                self._kernel(call, lambda o, e: done(o, e, True), long=long, conn=conn)
                return
            if exc is not None:
                self.ledger.refund(conn.account, *charged)
                self._answer(req, None, exc)
                return
            self._answer(req, *self._ioctl_result(conn, cmd, out, client_fd, token, charged[1]))

        self._kernel(start, done, long=long, conn=conn)

    def _ioctl_result(self, conn: Connection, cmd: int, out: bytes, client_fd: bytes, token: Optional[int],
                      memory: int) -> Tuple[Optional[Tuple[bytes, Optional[int], List[int]]], Optional[BaseException]]:
        fd_arg = R.fd_argument(cmd)
        if client_fd and fd_arg is not None:
            out = out[:fd_arg] + client_fd + out[fd_arg + 4:]
        if cmd == _abi.SESSION_PRESERVE_FD and conn.name is not None and token is not None:
            self.ledger.record(conn.name, token, conn.account, memory)
        elif cmd == _abi.SESSION_RETRIEVE_FD and conn.name is not None and token is not None:
            self.ledger.forget(conn.name, token)
        elif cmd == _abi.SESSION_FINISH and conn.name is not None:
            self.ledger.forget_session(conn.name)
        offset = R.fd_result(cmd)
        if offset is None:
            return (out, None, []), None
        fd = R.result_fd(out, offset)
        if conn.kind == SESSION:
            return (out, fd, [fd]), None
        try:
            theirs = self._session_socket(conn, fd, R.session_of(cmd, out))
        except OSError as exc:
            self.ledger.refund(conn.account, fds=FDS_PER_SESSION)
            return None, exc
        return (out, theirs, [theirs]), None

    def _session_socket(self, device: Connection, handle: int, name: Tuple[str, bytes]) -> int:
        """Wrap the emulator's session fd ``handle`` in a socket pair; returns
        the client's end, to be sent and then closed here."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            self.kernel.release(handle, self.kernel.boots)
            raise
        self._sessions_made += 1
        # The abstract name is what tells a session socket apart from any
        # other socket when a process adopts it with Session.from_fd.
        try:
            theirs.bind(P.SESSION_NAME_PREFIX + f"{os.getpid()}:{self.instance}:{self._sessions_made}".encode())
        except OSError:
            pass  # still a working handle; only from_fd will not know it
        ours.setblocking(False)
        conn = Connection(ours, SESSION, device.account)
        conn.handle, conn.boot, conn.name, conn.fds = handle, self.kernel.boots, name, FDS_PER_SESSION
        self._add(conn)
        return theirs.detach()

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
        if channel is not None:
            # A channel the client supplied: one reply, never waited for. If
            # it is not a usable socket the reply is lost, and so are any
            # fds in it (a session sent that way is released on its EOF).
            try:
                sock = socket.socket(fileno=channel)  # probes: ENOTSOCK for a non-socket
            except OSError as exc:
                log.info("reply channel unusable: %s", exc)
            else:
                try:
                    sock.sendmsg([data], P.fds_message(fds), SEND_FLAGS)
                except OSError as exc:
                    log.info("reply channel unusable: %s", exc)
                finally:
                    sock.detach()  # the caller closes the channel fd
            close_all(close_after)
            return
        if conn.closed:
            close_all(close_after)
            return
        if conn.outbox:
            conn.outbox.append((data, fds, list(close_after)))
            return
        if self._send(conn, data, fds, list(close_after)):
            return
        if not conn.closed and not conn.paused:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _send(self, conn: Connection, data: bytes, fds: List[int], close_after: List[int]) -> bool:
        """Send now if the socket takes it; else queue. True when sent (or
        when the connection died, which drops the reply with it)."""
        try:
            conn.sock.sendmsg([data], P.fds_message(fds), SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            conn.outbox.append((data, fds, close_after))
            return False
        except OSError:
            close_all(close_after)
            self._drop(conn)
            return True
        close_all(close_after)
        return True

    def _flush(self, conn: Connection) -> None:
        while conn.outbox:
            data, fds, close_after = conn.outbox.pop(0)
            if not self._send(conn, data, fds, close_after):
                # _send queued it at the end; put it back in front.
                conn.outbox.insert(0, conn.outbox.pop())
                return
            if conn.closed:
                return
        if not conn.paused:
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
            "kernel_busy": self._worker.busy,
            "waiting_for_kernel": len(self._parked),
        }
        info.update(self.kernel.describe())
        return info


def _describe(cmd: int, token: Optional[int], client_fd: bytes) -> str:
    command = _abi.BY_NUMBER.get(cmd)
    name = command.name if command is not None else f"ioctl {cmd:#x}"
    if client_fd:
        return f"{name} of fd {int.from_bytes(client_fd, 'little', signed=True)} as token {token}"
    return name
