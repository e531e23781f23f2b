"""The sd_notify protocol: datagrams to ``$NOTIFY_SOCKET``, without libsystemd.

A message is newline-separated ``KEY=VALUE`` lines, sent as one datagram,
with fds attached by SCM_RIGHTS. systemd reads its notify socket in its
event loop; when it is busy (a boot, a kexec, a flood of messages) the
socket's queue fills up (ten datagrams by default) and a blocking send would
wait without limit. Every send here is non-blocking on a connected socket,
so that ``poll()`` sees the queue of systemd's end, and waits at most until
a deadline.
"""
from __future__ import annotations

import array
import errno
import os
import select
import socket
import time
from typing import Any, Mapping, Optional, Sequence

from .._timeout import deadline_after, poll_ms
from ..errors import make, wrap

__all__ = ["notify_socket", "notify", "send", "barrier", "deadline_after", "fileno", "NO_SOCKET_HINT"]

NO_SOCKET_HINT = (
    "NOTIFY_SOCKET is not set: the process was not started by systemd, or its unit lets it "
    "send nothing (set NotifyAccess=main or Type=notify)"
)
#: How long a send waits for room in systemd's queue, unless told otherwise.
DEFAULT_TIMEOUT = 5.0


def notify_socket(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The socket address systemd gave in ``$NOTIFY_SOCKET``, or None."""
    env = os.environ if environ is None else environ
    return env.get("NOTIFY_SOCKET") or None


def _address(raw: str, op: str) -> str:
    """Turn ``$NOTIFY_SOCKET`` into an AF_UNIX address."""
    if raw.startswith("/"):
        address = raw
    elif raw.startswith("@"):
        # sd_notify's spelling of the abstract namespace: a leading NUL.
        address = "\0" + raw[1:]
    elif raw.startswith("vsock"):
        raise make(
            errno.EAFNOSUPPORT,
            op,
            "NOTIFY_SOCKET is an AF_VSOCK address, which cannot carry file descriptors",
            NOTIFY_SOCKET=raw,
        )
    else:
        raise make(errno.EAFNOSUPPORT, op, "NOTIFY_SOCKET is neither a path nor an @abstract name", NOTIFY_SOCKET=raw)
    if len(address.encode("utf-8", "surrogateescape")) > 107:
        # sun_path holds 108 bytes, the terminating NUL included.
        raise make(errno.ENAMETOOLONG, op, "the socket path does not fit in sun_path", NOTIFY_SOCKET=raw)
    return address


def fileno(fd: Any, op: str) -> int:
    """An int fd from an int or anything with ``fileno()``."""
    if isinstance(fd, bool):
        raise TypeError(f"{op}: expected an fd, not a bool")
    if isinstance(fd, int):
        return fd
    try:
        return int(fd.fileno())
    except AttributeError:
        raise TypeError(f"{op}: expected an int fd or an object with fileno(), not {type(fd).__name__}") from None


def _wait_writable(sock: socket.socket, deadline: Optional[float]) -> bool:
    """Wait for room in the peer's queue; False once the deadline passed."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while True:
        wait_ms = poll_ms(deadline)
        if wait_ms == 0:
            return False
        if poller.poll(wait_ms):
            return True


def send(state: str, fds: Sequence[Any], environ: Optional[Mapping[str, str]], op: str,
         deadline: Optional[float], **args: Any) -> bool:
    """Send one datagram to $NOTIFY_SOCKET before ``deadline`` (None: no
    limit); errors name ``op`` and ``args``. False when there is no socket."""
    raw = notify_socket(environ)
    if raw is None:
        return False
    address = _address(raw, op)
    numbers = [fileno(fd, op) for fd in fds]
    ancillary = []
    if numbers:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", numbers).tobytes()))
    payload = state.encode("utf-8", "surrogateescape")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            # Connected, the socket's POLLOUT tells whether systemd's queue
            # has room; unconnected it would only tell about our own buffer.
            sock.connect(address)
            while True:
                try:
                    sock.sendmsg([payload], ancillary)
                    break
                except InterruptedError:
                    continue
                except BlockingIOError:
                    if not _wait_writable(sock, deadline):
                        raise OSError(errno.EAGAIN, "systemd did not read its notify socket in time "
                                                    "(its queue is full)") from None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            detail = "nobody listens on NOTIFY_SOCKET (systemd went away, or the variable is stale)"
            raise make(exc.errno, op, detail, NOTIFY_SOCKET=raw, **args) from None
        if exc.errno is None:
            raise  # not a system call's failure: keep it as it is
        raise wrap(exc, op, NOTIFY_SOCKET=raw, **args) from None
    return True


def notify(state: str, fds: Sequence[Any] = (), *, timeout: float = DEFAULT_TIMEOUT,
           environ: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to systemd,
    with ``fds`` attached (SCM_RIGHTS), like ``sd_pid_notify_with_fds``.

    Waits at most ``timeout`` seconds (``math.inf``: no limit, 0: not at
    all) for room in systemd's queue. Returns False, sending nothing, when
    ``$NOTIFY_SOCKET`` is not set (the process was not started by systemd),
    True once the datagram is sent. The fds stay open here: systemd
    receives duplicates.

    Raises OSError: EAFNOSUPPORT (a NOTIFY_SOCKET that is not AF_UNIX),
    ENAMETOOLONG, ENOENT/ECONNREFUSED (nobody listens there), EACCES, EBADF
    (an fd is not open), ETOOMANYREFS/EINVAL (too many fds), EAGAIN
    (systemd's queue stayed full for ``timeout`` seconds), EINVAL (a bad
    timeout)."""
    deadline = deadline_after(timeout, "notify")
    return send(state, fds, environ, "notify", deadline)


def barrier(timeout: float = DEFAULT_TIMEOUT, *, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Wait until systemd has processed every message sent before
    (``BARRIER=1``, as ``sd_notify_barrier``): call it after storing fds and
    before exiting, so none is lost with the process. ``timeout`` covers
    the send and the wait together (``math.inf``: no limit).

    Returns False when there is no NOTIFY_SOCKET, True once systemd is done.

    Raises OSError: ETIMEDOUT (no answer within ``timeout`` seconds), EINVAL
    (a bad timeout), and the errors of :func:`notify`."""
    deadline = deadline_after(timeout, "barrier")
    if notify_socket(environ) is None:
        return False
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            send("BARRIER=1", [write_end], environ, "barrier", deadline, timeout=timeout)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                raise make(errno.ETIMEDOUT, "barrier", "systemd did not read its notify socket in time",
                           timeout=timeout) from None
            raise
        finally:
            # systemd closes its copy once it got this far; ours must go first
            # or the hang-up below could never come.
            os.close(write_end)
        poller = select.poll()
        poller.register(read_end, select.POLLHUP)
        while True:
            # Capped per poll (a C int of ms): 1e300 s must not overflow.
            if poller.poll(poll_ms(deadline)):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise make(errno.ETIMEDOUT, "barrier", "systemd did not answer BARRIER=1", timeout=timeout)
    finally:
        os.close(read_end)
    return True
