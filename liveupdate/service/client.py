"""The client side of the emulator service: a port that speaks to it.

``port_for(path)`` is what :func:`liveupdate.open` uses for
``emulator=PATH`` or ``$LIVEUPDATE_EMULATOR``. The device fd it returns is a
connection to the service; session fds are the sockets the service hands
out, one per session, so they behave like the kernel's session fds: close
the last copy (or let every process holding one die) and the session is
released; pass them on with SCM_RIGHTS, across fork and exec, or through
systemd's fd store, and :meth:`liveupdate.Session.from_fd` adopts them.

Errors are the kernel's: the service sends the emulated kernel's errno and
this port raises ``OSError`` with it. A few errnos are the service's own:
ESTALE (a handle from before an emulated kexec), ECONNREFUSED / ENOENT (no
service at that path), EPIPE / ECONNRESET (the service went away),
ETIMEDOUT (it did not answer in time), EACCES (not a uid it serves, or a
listener that is neither this user nor root: checked with SO_PEERCRED before
anything is sent), EPROTO (a peer that does not speak this protocol).
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import threading
from typing import Any, Dict, List, Optional, Tuple

from .. import _abi, _port
from .. import _timeout as _seconds
from .._timeout import poll_ms
from . import protocol as P

__all__ = ["ServicePort", "port_for", "kexec", "status", "is_session_socket", "DEFAULT_TIMEOUT", "TIMEOUT_ENV"]

#: Seconds to wait for the service's answer before ETIMEDOUT. A kernel never
#: times out, but a stopped service must not hang its clients for ever.
TIMEOUT_ENV = "LIVEUPDATE_EMULATOR_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
#: fcntl.ioctl() copies at most this many bytes of argument; so do we.
_IOCTL_ARG_MAX = 1024

_FD_FIELD = struct.Struct("=i")
_SEND_FLAGS = socket.MSG_NOSIGNAL
_RECV_FLAGS = socket.MSG_CMSG_CLOEXEC
# Which commands carry an fd in or out, and where: the command table's
# fd_arg and fd_result (liveupdate._abi), read at each call so that a row
# added at run time (_abi.register) is relayed like the others.
_BY_NUMBER = _abi.BY_NUMBER


def _timeout(timeout: Optional[float], op: str) -> float:
    """The caller's timeout, else $LIVEUPDATE_EMULATOR_TIMEOUT, else the
    default; inf waits for ever. EINVAL for NaN, negatives and non-numbers."""
    if timeout is not None:
        return _seconds.seconds(timeout, op)
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    return _seconds.from_text(text, op, TIMEOUT_ENV)


def _wrap_fd(fd: int) -> socket.socket:
    # Family and type given: no probing syscalls. The caller detaches it, so
    # the fd's lifetime stays with whoever owns the number.
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fd)


class ServicePort:
    """A port whose kernel is the emulator service listening at ``path``
    (None for a port that only serves adopted session fds)."""

    kind = "service"

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        # fd -> pid of the process that received it from the service. That
        # process reads replies on the fd itself; any other (a forked child,
        # a receiver of the fd) asks for its reply on a private socket, so a
        # reply always reaches the process that asked.
        self._owner: Dict[int, int] = {}
        self._lock = threading.Lock()
        self._seq = 0

    def __repr__(self) -> str:
        return f"<liveupdate port: emulator service {self.path!r}>"

    # -- the port contract --------------------------------------------------

    def open_device(self, path: str) -> int:
        """Connect to the service and open its device; returns the connection's fd.

        Raises OSError: EBUSY (another process holds the emulated device),
        ENOENT / ECONNREFUSED (no service at the socket path), EACCES (the
        service does not serve this uid, or its listener is another uid's), EIO (its kernel failed to boot)."""
        if self.path is None:
            raise OSError(errno.ENODEV, "this port only serves adopted session fds; name the service socket")
        sock = self._connect()
        try:
            self._call(sock.fileno(), P.OP_OPEN_DEVICE, 0, os.fsencode(path), direct=True)
        except BaseException:
            sock.close()
            raise
        fd = sock.detach()
        self._owner[fd] = os.getpid()
        return fd

    def ioctl(self, fd: int, cmd: int, arg: bytes) -> bytes:
        """:func:`fcntl.ioctl` semantics, run by the service's kernel.

        Raises OSError with the emulated kernel's errno, or ESTALE for a
        handle from before an emulated kexec (see the module doc for the
        service's own errnos)."""
        if not isinstance(arg, (bytes, bytearray, memoryview)):
            # What the emulator says too: this port carries struct bytes only.
            raise OSError(errno.EFAULT, "the argument must be the struct's bytes")
        arg = bytes(arg)
        if len(arg) > _IOCTL_ARG_MAX:
            raise ValueError("ioctl string arg too long")
        row = _BY_NUMBER.get(cmd)
        fd_at = None if row is None else row.fd_result
        if fd_at is not None:
            _reserve_fd_slot(fd)
        fd_in = None
        arg_at = None if row is None else row.fd_arg
        if arg_at is not None and len(arg) >= arg_at + 4:
            fd_in = _FD_FIELD.unpack_from(arg, arg_at)[0]
            if fd_in < 0:
                fd_in = None
        direct = self._owner.get(fd) == os.getpid()
        try:
            out, fd_out = self._call(fd, P.OP_IOCTL, cmd, arg, direct=direct, fd_in=fd_in)
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                # Not a service handle at all: what the kernel says of an
                # ioctl it does not know on a file.
                raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY)) from None
            raise
        if fd_out is not None:
            if row is None or fd_at is None or len(out) < fd_at + 4:
                os.close(fd_out)
                raise OSError(errno.EPROTO, "the emulator service sent an fd with a result that has none")
            out = out[:fd_at] + _FD_FIELD.pack(fd_out) + out[fd_at + 4:]
            if row.target == "device":  # a new session: a handle of this process
                self._owner[fd_out] = os.getpid()
        elif fd_at is not None:
            # The service made the fd but it never arrived: the fd table of
            # this process is full (the kernel says EMFILE up front).
            raise OSError(errno.EMFILE, "no fd could be received from the emulator service")
        return out

    def close(self, fd: int) -> None:
        """Close a device or session fd (the release() of that file)."""
        self._owner.pop(fd, None)
        os.close(fd)

    def adopt(self, fd: int) -> None:
        """Treat ``fd`` as received from elsewhere (it may be shared)."""
        self._owner.pop(fd, None)

    # -- plumbing -----------------------------------------------------------

    def _connect(self) -> socket.socket:
        assert self.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise OSError(exc.errno, f"no emulator service is listening at {self.path} "
                                         f"(start one with: liveupdate emulator serve --socket {self.path})") from None
            raise OSError(exc.errno, f"cannot connect to the emulator service at {self.path}: "
                                     f"{os.strerror(exc.errno or 0)}") from None
        try:
            _check_listener(sock, self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _call(self, fd: int, op: int, value: int, payload: bytes, direct: bool,
              fd_in: Optional[int] = None, timeout: Optional[float] = None) -> Tuple[bytes, Optional[int]]:
        """Send one request on ``fd`` and wait for its reply: (payload, fd)."""
        timeout = _timeout(timeout, "emulator service call")
        if direct:
            with self._lock:
                return self._exchange(fd, op, value, payload, fd_in, None, timeout)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with theirs:
                return self._exchange(fd, op, value, payload, fd_in, theirs.fileno(), timeout,
                                      reply_on=mine, channel_owner=theirs)
        finally:
            mine.close()

    def _exchange(self, fd: int, op: int, value: int, payload: bytes, fd_in: Optional[int],
                  channel: Optional[int], timeout: float, reply_on: Optional[socket.socket] = None,
                  channel_owner: Optional[socket.socket] = None) -> Tuple[bytes, Optional[int]]:
        seq = self._next_seq()
        flags = 0
        fds: List[int] = []
        if channel is not None:
            flags |= P.FLAG_REPLY_CHANNEL
            fds.append(channel)
        if fd_in is not None:
            flags |= P.FLAG_FD
            fds.append(fd_in)
        data = P.encode(op, seq, value, payload, flags)
        sock = _wrap_fd(fd)
        try:
            try:
                sock.sendmsg([data], P.fds_message(fds), _SEND_FLAGS)
            except OSError as exc:
                if exc.errno == errno.EBADF and fd_in is not None and _is_open(fd):
                    # The fd to preserve is not open here. Ask without it:
                    # the service's kernel then reports EBADF, or an earlier
                    # error in the kernel's own order of checks.
                    data = P.encode(op, seq, value, payload, flags & ~P.FLAG_FD)
                    sock.sendmsg([data], P.fds_message(fds[:-1]), _SEND_FLAGS)
                elif exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    # The service may have refused us and hung up already:
                    # its reason is waiting in the queue.
                    _raise_refusal(sock)
                    raise
                else:
                    raise
            if channel_owner is not None:
                # The service has its copy: drop ours so a dead service means EOF.
                channel_owner.close()
            return _await_reply(reply_on if reply_on is not None else sock, seq, timeout)
        except OSError as exc:
            raise _transport_error(exc, self.path) from None
        finally:
            sock.detach()


_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def listener_credentials(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process that listens at the other end of the
    connected unix socket ``sock`` (SO_PEERCRED: as of its listen())."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _check_listener(sock: socket.socket, path: str) -> None:
    """Refuse a listener that is neither this user nor root, before a
    single byte (or fd) is sent: in a directory others can write, another
    uid may have bound the socket path first and would receive our
    sessions and memfds."""
    try:
        pid, uid, _ = listener_credentials(sock)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot tell who listens at {path} (SO_PEERCRED): "
                                 f"{os.strerror(exc.errno or 0)}") from None
    mine = os.geteuid()
    if uid not in (mine, 0):
        raise OSError(errno.EACCES, f"the socket {path} is served by uid {uid} (pid {pid}), neither this user "
                                    f"(uid {mine}) nor root: refusing to send it anything; another user may have "
                                    f"taken the path first, so keep the socket in a directory only you can write "
                                    f"(e.g. $XDG_RUNTIME_DIR)")


def _reserve_fd_slot(fd: int) -> None:
    """EMFILE now if this process has no fd left for the result.

    The kernel takes the new fd (get_unused_fd_flags) before it looks at
    the request, so a full fd table is EMFILE whatever else is wrong; the
    service could only find out after doing the work."""
    try:
        os.close(os.dup(fd))
    except OSError as exc:
        if exc.errno == errno.EMFILE:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE)) from None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _transport_error(exc: OSError, path: Optional[str]) -> OSError:
    if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
        where = f" at {path}" if path else ""
        return OSError(exc.errno, f"the emulator service{where} is gone (stopped or restarted); "
                                  f"handles of a service do not survive it")
    return exc


def _raise_refusal(sock: socket.socket) -> None:
    """Raise the service's refusal if one is queued on ``sock``; else return.

    A peer that closes with our request unread leaves a pending
    ECONNRESET that the first receive reports ahead of the queued refusal,
    hence the second try."""
    for _ in range(2):
        try:
            data, anc, _, _ = sock.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, _RECV_FLAGS | socket.MSG_DONTWAIT)
            break
        except ConnectionResetError:
            continue
        except OSError:
            return
    else:
        return
    for fd in P.received_fds(anc):
        os.close(fd)
    try:
        msg = P.decode(data)
    except P.ProtocolError:
        return
    if msg.op == P.OP_REFUSED:
        raise OSError(msg.value or errno.EACCES, msg.payload.decode("utf-8", "replace"))


def _await_reply(sock: socket.socket, seq: int, timeout: float) -> Tuple[bytes, Optional[int]]:
    """Wait (bounded) for the reply numbered ``seq``; raise its errno if it
    is an error. Replies to earlier, abandoned requests are discarded."""
    deadline = _seconds.deadline_after(timeout, "emulator service call")
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        # poll_ms caps one wait at a C int of ms: a huge timeout loops here.
        wait_ms = poll_ms(deadline)
        if wait_ms == 0 or not poller.poll(wait_ms):
            if wait_ms != 0 and _seconds.remaining(deadline) > 0:
                continue
            raise OSError(errno.ETIMEDOUT, f"the emulator service did not answer within {timeout:g} s "
                                           f"(set {TIMEOUT_ENV} to wait longer)")
        try:
            data, anc, flags, _ = sock.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, _RECV_FLAGS)
        except ConnectionResetError:
            _raise_refusal(sock)
            raise
        fds = P.received_fds(anc)
        if not data:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.ECONNRESET, "connection closed")
        try:
            msg = P.decode(data, truncated=bool(flags & socket.MSG_TRUNC))
        except P.ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            raise OSError(exc.errno, f"bad reply from the emulator service: {exc}") from None
        if not msg.flags & P.FLAG_REPLY:
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EPROTO, "the peer sent a request where a reply of the emulator service was due")
        if msg.op == P.OP_REFUSED:
            for fd in fds:
                os.close(fd)
            raise OSError(msg.value or errno.EACCES, msg.payload.decode("utf-8", "replace") or None)
        if msg.seq != seq:
            for fd in fds:  # a reply to a request this process gave up on
                os.close(fd)
            continue
        if msg.value:
            for fd in fds:
                os.close(fd)
            detail = msg.payload.decode("utf-8", "replace")
            if detail:
                raise OSError(msg.value, detail)
            raise OSError(msg.value, os.strerror(msg.value))
        if len(fds) > 1:
            for fd in fds[1:]:
                os.close(fd)
        return msg.payload, (fds[0] if fds else None)


# -- ports, recognizer, control operations -----------------------------------

_ports: Dict[str, ServicePort] = {}
_ports_lock = threading.Lock()


def port_for(path: str) -> ServicePort:
    """The port of the service listening at ``path`` (one per path per process)."""
    key = os.path.abspath(os.fsdecode(path))
    with _ports_lock:
        port = _ports.get(key)
        if port is None:
            port = _ports[key] = ServicePort(key)
        return port


_ADOPTED = ServicePort(None)


def is_session_socket(fd: int) -> bool:
    """True when ``fd`` is a session handle of an emulator service: a
    SOCK_SEQPACKET unix socket whose address carries the service's mark."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            return False
        name = sock.getsockname()
        return isinstance(name, bytes) and name.startswith(P.SESSION_NAME_PREFIX)
    except OSError:
        return False
    finally:
        sock.detach()


def _recognize(fd: int, link: str) -> Optional[ServicePort]:
    if not link.startswith("socket:") or not is_session_socket(fd):
        return None
    # A session fd carries its own connection: whichever service made it,
    # one port serves it. The fd may be shared with other processes, so
    # replies come back on private channels.
    _ADOPTED.adopt(fd)
    return _ADOPTED


_port.register_recognizer(_recognize)


def _control(path: str, op: int, timeout: Optional[float] = None) -> Dict[str, Any]:
    port = ServicePort(os.path.abspath(os.fsdecode(path)))
    sock = port._connect()
    try:
        payload, fd = port._call(sock.fileno(), op, 0, b"", direct=True, timeout=timeout)
    finally:
        sock.close()
    if fd is not None:
        os.close(fd)
    return json.loads(payload.decode("utf-8"))


def kexec(path: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """Run an emulated kexec in the service at ``path``: outgoing sessions
    still open are serialized, every handle of the old kernel turns stale
    (ESTALE), and a new kernel boots from the preserved memory (written to
    the service's image first, when it has one). Returns what the service
    reports (the new boot's number, the image path).

    Raises OSError: ENOENT / ECONNREFUSED (no service), EACCES, EIO (the
    new kernel failed to boot: the service stops), ETIMEDOUT."""
    return _control(path, P.OP_KEXEC, timeout)


def status(path: str, timeout: Optional[float] = None) -> Dict[str, Any]:
    """What the service at ``path`` holds: its pid, boots, connections by
    kind and what its kernel reports. Raises OSError as :func:`kexec`."""
    return _control(path, P.OP_STATUS, timeout)
