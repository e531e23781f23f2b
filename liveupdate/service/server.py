"""The emulator service: one emulated kernel, many client processes.

The service is a relay. The emulated kernel runs in this process and its
port works on real fds of this process; each client connection stands for
one of those fds:

* a connection to the listening socket that opened the device *is* the
  client's device fd (EOF on it releases the device, as closing the real
  one does, so exclusivity spans processes);
* every session gets its own socket pair: the service keeps one end tied to
  the emulator's session fd and hands the other to the client as its
  session fd. The kernel releases a session when its last fd goes; here the
  service sees EOF when the last copy of the client end is closed, in
  whatever processes it travelled to, and releases the emulator's session;
* preserved fds arrive with SCM_RIGHTS, retrieved fds leave the same way.

One thread, non-blocking sockets, one datagram per message: a client that
stops mid-request, floods, or never reads its replies holds up only itself.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import select
import selectors
import signal
import socket
import struct
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import _abi
from ..errors import KernelPanic
from . import protocol as P

__all__ = ["Server", "ALLOWED_BY_DEFAULT"]

log = logging.getLogger("liveupdate.service")

_PEERCRED = struct.Struct("3i")
_FD_FIELD = struct.Struct("=i")
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_RECV_FLAGS = socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
#: Messages taken from one connection per wake-up, so that a flooding client
#: shares the loop with the others.
_BATCH = 16

CONTROL, DEVICE, SESSION = "control", "device", "session"
#: Which commands carry an fd in (fd_arg) or out (fd_result), and where: the
#: command table's rows. A device command's fd is a new session (relayed as
#: a session socket), a session command's a file (passed on as it is).
_BY_NUMBER = _abi.BY_NUMBER
#: Failures that a release not yet seen could turn into another answer: a
#: name or file still taken (EEXIST, EBUSY), a session still retrieved (EINVAL).
_RELEASE_SENSITIVE = (errno.EEXIST, errno.EBUSY, errno.EINVAL)
_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR

ALLOWED_BY_DEFAULT = "the service's own uid and root"


class _Connection:
    __slots__ = ("sock", "kind", "handle", "boot", "outbox", "peer", "name")

    def __init__(self, sock: socket.socket, kind: str, peer: Tuple[int, int, int] = (0, 0, 0)) -> None:
        self.sock = sock
        self.kind = kind
        self.handle = -1  # the emulator's fd this connection stands for
        self.boot = -1  # which boot of the kernel the handle belongs to
        # Replies the client has not taken yet: (bytes, fds to send, fds to close after).
        self.outbox: List[Tuple[bytes, List[int], List[int]]] = []
        self.peer = peer
        self.name = b""


class Server:
    """Serve ``kernel`` (see :class:`liveupdate.service.kernel.Kernel`) on
    the AF_UNIX socket ``listener`` (bound and listening).

    Only peers whose uid is in ``allowed_uids`` are served; others get an
    EACCES refusal and a closed connection."""

    def __init__(self, kernel: Any, listener: socket.socket, allowed_uids: Sequence[int]) -> None:
        self.kernel = kernel
        self.listener = listener
        self.listener.setblocking(False)
        self.allowed_uids = frozenset(allowed_uids)
        self.instance = os.urandom(6).hex()
        self._sessions_made = 0
        self._conns: Dict[int, _Connection] = {}
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        # An fd kept in reserve: when the table is full, closing it lets the
        # service accept and drop the excess connection instead of spinning
        # on a listener that stays readable.
        self._reserve: Optional[int] = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
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
                    try:
                        os.read(self._wake_r, 512)
                    except OSError:
                        pass
                else:
                    conn = key.data
                    if conn.sock.fileno() < 0:
                        continue  # dropped while handling an earlier event of this batch
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._flush(conn)
                        if mask & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                            self._read(conn)
                    except Exception:
                        # A bug of ours must cost one connection, not the
                        # service and every other client's sessions.
                        log.error("dropping a %s connection after an internal error:\n%s", conn.kind,
                                  traceback.format_exc())
                        self._drop(conn)
        self.close()
        return self.exit_code

    def close(self) -> None:
        """Release every handle (as every process exiting would) and the sockets."""
        for conn in list(self._conns.values()):
            self._drop(conn)
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
        for _ in range(_BATCH):
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
                peer = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError as exc:
                log.warning("no credentials for a new connection: %s", exc)
                sock.close()
                continue
            if peer[1] not in self.allowed_uids:
                log.warning("refused pid %d uid %d: only uids %s are served", peer[0], peer[1],
                            sorted(self.allowed_uids))
                self._refuse(sock, errno.EACCES, f"uid {peer[1]} may not use this emulator service "
                                                 f"(it serves {ALLOWED_BY_DEFAULT})")
                continue
            self._add(_Connection(sock, CONTROL, peer))

    def _shed_one(self) -> None:
        if self._reserve is None:
            return
        os.close(self._reserve)
        self._reserve = None
        try:
            sock, _ = self.listener.accept()
            log.warning("fd table full: refused a connection")
            self._refuse(sock, errno.EMFILE, "the emulator service has no free fd")
        except OSError:
            pass
        finally:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None

    def _refuse(self, sock: socket.socket, err: int, detail: str) -> None:
        try:
            sock.sendmsg([P.encode(P.OP_REFUSED, 0, err, detail.encode(), P.FLAG_REPLY)], [], _SEND_FLAGS)
            # Closing with requests unread would make the client's next
            # receive fail with ECONNRESET before it sees why: read them.
            for _ in range(_BATCH):
                _, anc, _, _ = sock.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, _RECV_FLAGS)
                _close_all(P.received_fds(anc))
        except OSError:
            pass
        sock.close()

    def _add(self, conn: _Connection) -> None:
        self._conns[conn.sock.fileno()] = conn
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Connection) -> None:
        """The client's last copy is gone (or it misbehaved): release what the
        connection stood for, exactly as the kernel does on the last close."""
        fd = conn.sock.fileno()
        if fd < 0:
            return
        self._conns.pop(fd, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        for _, _, to_close in conn.outbox:
            _close_all(to_close)
        conn.outbox = []
        if conn.handle >= 0:
            handle, conn.handle = conn.handle, -1
            try:
                self.kernel.release(handle, conn.boot)
            except OSError as exc:
                log.warning("releasing %s handle %d: %s", conn.kind, handle, exc)
            except Exception:  # an emulator bug must not take the service down
                log.error("releasing %s handle %d failed:\n%s", conn.kind, handle, traceback.format_exc())

    # -- reading requests ---------------------------------------------------

    def _read(self, conn: _Connection) -> None:
        for _ in range(_BATCH):
            if conn.outbox:
                return  # backpressure: read more once the client took its replies
            try:
                data, anc, flags, _ = conn.sock.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, _RECV_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            fds = P.received_fds(anc)
            if not data:
                _close_all(fds)
                self._drop(conn)  # EOF: every copy of the client's end is closed
                return
            try:
                self._request(conn, data, flags, fds)
            finally:
                _close_all(fds)
            if conn.sock.fileno() < 0:
                return

    def _request(self, conn: _Connection, data: bytes, flags: int, fds: List[int]) -> None:
        """Answer one datagram. ``fds`` are closed by the caller afterwards;
        whatever must outlive the request is dup'ed or handed on first."""
        try:
            msg = P.decode(data, truncated=bool(flags & socket.MSG_TRUNC))
            if flags & socket.MSG_CTRUNC:
                raise P.ProtocolError(errno.EPROTO, f"more than {P.MAX_FDS} fds attached")
            if msg.flags & P.FLAG_REPLY:
                log.info("dropped a reply sent to the service on a %s connection", conn.kind)
                return
            wanted = bin(msg.flags & (P.FLAG_REPLY_CHANNEL | P.FLAG_FD)).count("1")
            if len(fds) != wanted:
                raise P.ProtocolError(errno.EPROTO, f"flags announce {wanted} fds, {len(fds)} arrived")
        except P.ProtocolError as exc:
            seq = P.HEADER.unpack_from(data)[5] if len(data) >= P.HEADER.size else 0
            log.info("bad request on %s connection: %s", conn.kind, exc)
            self._reply(conn, None, 0, seq, exc.errno, str(exc).encode())
            return
        channel = fds[0] if msg.flags & P.FLAG_REPLY_CHANNEL else None
        fd_in = fds[-1] if msg.flags & P.FLAG_FD else None
        try:
            payload, fd_out, close_after = self._dispatch(conn, msg, fd_in)
        except OSError as exc:
            detail = exc.strerror if exc.strerror and exc.strerror != os.strerror(exc.errno or 0) else ""
            self._reply(conn, channel, msg.op, msg.seq, exc.errno or errno.EIO, detail.encode()[: P.MAX_PAYLOAD])
            return
        except KernelPanic as exc:
            log.critical("the emulated kernel panicked: %s", exc)
            self._reply(conn, channel, msg.op, msg.seq, errno.EIO, f"kernel panic: {exc}".encode()[: P.MAX_PAYLOAD])
            self.stop(70)
            return
        except Exception as exc:  # an emulator bug: say so, keep serving the others
            log.error("request op=%d cmd=%#x failed:\n%s", msg.op, msg.value, traceback.format_exc())
            self._reply(conn, channel, msg.op, msg.seq, errno.EIO,
                        f"emulator service internal error: {exc!r}".encode()[: P.MAX_PAYLOAD])
            return
        self._reply(conn, channel, msg.op, msg.seq, 0, payload, fd_out, close_after)

    def _dispatch(self, conn: _Connection, msg: P.Message, fd_in: Optional[int]) -> Tuple[bytes, Optional[int], List[int]]:
        """Run one request; returns (payload, fd to send back, fds to close
        once sent). Raises OSError with the errno to answer."""
        if msg.op == P.OP_IOCTL:
            if conn.kind == CONTROL:
                raise OSError(errno.ENOTTY, "this connection holds no device or session: open the device first")
            return self._ioctl(conn, msg.value, msg.payload, fd_in)
        if msg.op == P.OP_STATUS:
            self._reap(conn)
            return json.dumps(self.status(), sort_keys=True).encode(), None, []
        if conn.kind != CONTROL:
            raise OSError(errno.EPROTO, f"op {msg.op} is only for a fresh connection to the service")
        if msg.op == P.OP_OPEN_DEVICE:
            path = msg.payload.decode("utf-8", "surrogateescape")
            try:
                handle = self.kernel.port.open_device(path)
            except OSError as exc:
                if exc.errno != errno.EBUSY or not self._reap(conn):
                    raise
                handle = self.kernel.port.open_device(path)
            conn.kind, conn.handle, conn.boot = DEVICE, handle, self.kernel.boots
            return b"", None, []
        if msg.op == P.OP_KEXEC:
            # Sessions whose last fd is closed are released before the
            # reboot, as the kernel released them at close: none crosses.
            self._reap(conn)
            info = self.kernel.kexec()
            log.info("kexec: %s", info)
            return json.dumps(info, sort_keys=True).encode(), None, []
        raise OSError(errno.EPROTO, f"unknown op {msg.op}")

    def _ioctl(self, conn: _Connection, cmd: int, arg: bytes, fd_in: Optional[int]) -> Tuple[bytes, Optional[int], List[int]]:
        if conn.boot != self.kernel.boots:
            raise OSError(errno.ESTALE, f"this {conn.kind} handle belongs to the kernel before an emulated kexec "
                                        f"(boot {conn.boot}; now boot {self.kernel.boots})")
        client_fd = b""
        row = _BY_NUMBER.get(cmd)
        arg_at = None if row is None else row.fd_arg
        if arg_at is not None and len(arg) >= arg_at + 4:
            # The struct names the client's fd number; the file itself came
            # with SCM_RIGHTS (or, for an fd the client could not send, -1,
            # which this process's kernel judges bad exactly as the client's
            # kernel would have).
            client_fd = arg[arg_at:arg_at + 4]
            arg = arg[:arg_at] + _FD_FIELD.pack(-1 if fd_in is None else fd_in) + arg[arg_at + 4:]
        try:
            out = self.kernel.port.ioctl(conn.handle, cmd, arg)
        except OSError as exc:
            # The kernel releases a file at its last close, before close()
            # returns; here the EOF of a closed handle may still wait in the
            # loop. The answers such a pending release would change are
            # only these errors: release what is closed, then ask again.
            if exc.errno not in _RELEASE_SENSITIVE or not self._reap(conn):
                raise
            out = self.kernel.port.ioctl(conn.handle, cmd, arg)
        if client_fd and arg_at is not None:
            out = out[:arg_at] + client_fd + out[arg_at + 4:]
        fd_at = None if row is None else row.fd_result
        if row is None or fd_at is None:
            return out, None, []
        fd = _FD_FIELD.unpack_from(out, fd_at)[0]
        if row.target == "device":
            return out, *self._session_socket(fd)
        return out, fd, [fd]

    def _session_socket(self, handle: int) -> Tuple[int, List[int]]:
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
        conn = _Connection(ours, SESSION)
        conn.handle, conn.boot = handle, self.kernel.boots
        self._add(conn)
        fd = theirs.detach()
        return fd, [fd]

    def _reap(self, current: _Connection) -> int:
        """Finish every connection whose client end is closed everywhere:
        handle what it sent before closing, then release its handle.
        Returns how many; ``current`` (the connection being answered) is
        left for the loop, so its requests keep their order."""
        if self._reaping:
            return 0
        self._reaping = True
        try:
            poller = select.poll()
            for fd in self._conns:
                poller.register(fd, _HUNG_UP)
            dead = [self._conns[fd] for fd, events in poller.poll(0)
                    if events & _HUNG_UP and fd in self._conns and self._conns[fd] is not current]
            for conn in dead:
                self._drain(conn)
            return len(dead)
        finally:
            self._reaping = False

    def _drain(self, conn: _Connection) -> None:
        # The peer is gone: its queued requests are bounded by the socket's
        # buffer, and every reply fails with EPIPE, which drops it.
        for _ in range(100000):
            if conn.sock.fileno() < 0:
                return
            if conn.outbox:
                self._flush(conn)
            else:
                self._read(conn)
        self._drop(conn)

    # -- replies ------------------------------------------------------------

    def _reply(self, conn: _Connection, channel: Optional[int], op: int, seq: int, err: int, payload: bytes,
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
                    sock.sendmsg([data], P.fds_message(fds), _SEND_FLAGS)
                except OSError as exc:
                    log.info("reply channel unusable: %s", exc)
                finally:
                    sock.detach()  # the caller closes the channel fd
            _close_all(close_after)
            return
        if conn.outbox:
            conn.outbox.append((data, fds, list(close_after)))
            return
        if self._send(conn, data, fds, list(close_after)):
            return
        if conn.sock.fileno() >= 0:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _send(self, conn: _Connection, data: bytes, fds: List[int], close_after: List[int]) -> bool:
        """Send now if the socket takes it; else queue. True when sent (or
        when the connection died, which drops the reply with it)."""
        try:
            conn.sock.sendmsg([data], P.fds_message(fds), _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            conn.outbox.append((data, fds, close_after))
            return False
        except OSError:
            _close_all(close_after)
            self._drop(conn)
            return True
        _close_all(close_after)
        return True

    def _flush(self, conn: _Connection) -> None:
        while conn.outbox:
            data, fds, close_after = conn.outbox.pop(0)
            if not self._send(conn, data, fds, close_after):
                # _send queued it at the end; put it back in front.
                conn.outbox.insert(0, conn.outbox.pop())
                return
            if conn.sock.fileno() < 0:
                return
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
        }
        info.update(self.kernel.describe())
        return info


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
