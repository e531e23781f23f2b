"""What each request of a client does: open the device, run an ioctl on a
device or session, kexec; and how each is answered.

The ioctl relay: the struct goes to the emulated kernel as the client sent
it, but for fds (see :mod:`.requests`); before a call that makes the
kernel hold something for the client, the client's budget is charged
(:mod:`.budget`), and given back when the call fails or the kernel later
lets go. Part of :class:`.server.Server` (the event loop, connections and
replies are in :mod:`.server`).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import _abi
from ..errors import KernelPanic
from . import protocol as P
from . import requests as R
from .budget import FDS_PER_DEVICE, FDS_PER_FILE, FDS_PER_SESSION, Ledger
from .connection import CONTROL, DEVICE, SESSION, Connection, close_all
from .scheduler import KernelQueue

__all__ = ["Relay"]

log = logging.getLogger("liveupdate.service")

#: Failures that a release not yet seen could turn into another answer: a
#: name or file still taken (EEXIST, EBUSY), a session still retrieved (EINVAL).
_RELEASE_SENSITIVE = (errno.EEXIST, errno.EBUSY, errno.EINVAL)
_NEEDS_KERNEL = (P.OP_IOCTL, P.OP_OPEN_DEVICE, P.OP_KEXEC)

Result = Tuple[bytes, Optional[int], List[int]]


class Relay:
    """The requests half of the server (a mixin of :class:`.server.Server`)."""

    kernel: Any
    ledger: Ledger
    instance: str
    _queue: KernelQueue
    _sessions_made: int
    _reap: Callable[[Connection], int]
    _add: Callable[[Connection], None]
    _reply: Callable[..., None]
    status: Callable[[], Dict[str, Any]]
    stop: Callable[[int], None]

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
            if not self._queue.busy and not self._queue.waiting:
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
            self._queue.run(lambda: self._open_device(req), lambda result, exc: self._answer(req, result, exc), conn=conn)
            return
        # Sessions whose last fd is closed are released before the reboot,
        # as the kernel released them at close: none crosses.
        self._queue.run(lambda: self._reap(conn), lambda *_: None)
        self._queue.run(self.kernel.kexec, lambda info, exc: self._kexec_done(req, info, exc), exclusive=True, conn=conn)

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
            return bytes(self.kernel.port.ioctl(conn.handle, cmd, arg))

        def charge() -> None:
            # On the loop, on the kernel's turn: the budget sees every call
            # before; and after the kernel's own size checks, as the kernel
            # reserves an fd or pins pages only for a well-formed struct.
            fds, memory = 0, 0
            if R.kernel_refuses_size(cmd, arg):
                return
            if conn.kind == DEVICE and cmd in (_abi.IOCTL_CREATE_SESSION, _abi.IOCTL_RETRIEVE_SESSION):
                fds = FDS_PER_SESSION
            elif conn.kind == SESSION and cmd == _abi.SESSION_PRESERVE_FD:
                if token is not None and self.ledger.has(conn.name, token):
                    return  # luo_preserve_file() answers EEXIST before it pins or takes anything
                memory = R.preserve_cost(req.fd_in)  # 0: the kernel refuses the file (EBADF, ENOENT ...)
                fds = FDS_PER_FILE if memory else 0
            if fds or memory:
                self.ledger.charge(conn.account, fds, memory, what=_describe(cmd, token, client_fd))
                charged[:] = [fds, memory]

        def done(out: Any, exc: Optional[BaseException], retried: bool = False) -> None:
            if (isinstance(exc, OSError) and exc.errno in _RELEASE_SENSITIVE and not retried
                    and self._reap(conn)):
                # The kernel releases a file at its last close, before close()
                # returns; here the EOF of a closed handle may still wait in the
                # loop. The answers such a pending release would change are
                # only these errors: release what is closed, then ask again.
                self._queue.run(call, lambda o, e: done(o, e, True), long=long, conn=conn)
                return
            if exc is not None:
                self.ledger.refund(conn.account, *charged)
                self._answer(req, None, exc)
                return
            self._answer(req, *self._ioctl_result(conn, cmd, out, client_fd, token, charged))

        self._queue.run(call, done, long=long, conn=conn, prepare=charge)

    def _ioctl_result(self, conn: Connection, cmd: int, out: bytes, client_fd: bytes, token: Optional[int],
                      charged: List[int]) -> Tuple[Optional[Tuple[bytes, Optional[int], List[int]]], Optional[BaseException]]:
        fd_arg = R.fd_argument(cmd)
        if client_fd and fd_arg is not None:
            out = out[:fd_arg] + client_fd + out[fd_arg + 4:]
        if cmd == _abi.SESSION_PRESERVE_FD and conn.name is not None and token is not None:
            if charged[0]:  # what was not charged is not given back either
                self.ledger.record(conn.name, token, conn.account, charged[1])
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



def _describe(cmd: int, token: Optional[int], client_fd: bytes) -> str:
    command = _abi.BY_NUMBER.get(cmd)
    name = command.name if command is not None else f"ioctl {cmd:#x}"
    if client_fd:
        return f"{name} of fd {int.from_bytes(client_fd, 'little', signed=True)} as token {token}"
    return name
