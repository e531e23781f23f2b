"""Keep Live Update sessions in systemd's file descriptor store.

systemd (since v261) understands LUO session fds pushed into a service's fd
store: it keeps them through a kexec live update and hands the session fd,
re-retrieved in the new kernel, back to the service under the same name, in
``LISTEN_FDS``/``LISTEN_FDNAMES`` as for any stored fd. The same mechanism
keeps a session across a plain restart of the service. This module speaks
that protocol in Python, without libsystemd:

    # before: create the session, preserve files, then hand it to systemd
    systemd.store_session(session)          # FDSTORE=1, FDNAME=<session name>
    systemd.barrier()                       # systemd has taken it

    # after a restart or a kexec
    sessions = systemd.find_sessions()      # {"cache": Session, ...}

The unit needs ``FileDescriptorStoreMax=`` (how many fds it may store),
``FileDescriptorStorePreserve=yes`` (keep the store while the service is
stopped or restarting) and a ``NotifyAccess=`` that lets the process send
(``Type=notify`` implies ``main``).
"""
from __future__ import annotations

import array
import errno
import os
import select
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence

from .errors import make, wrap
from .session import Session

__all__ = [
    "LISTEN_FDS_START",
    "FDNAME_MAX",
    "ListenFd",
    "fdname_is_valid",
    "notify_socket",
    "notify",
    "store_fd",
    "store_session",
    "remove_fd",
    "barrier",
    "listen_fds",
    "find_sessions",
]

#: systemd passes fds from 3 on, in order (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: The longest name systemd accepts for a stored fd.
FDNAME_MAX = 255

_NO_SOCKET_HINT = (
    "NOTIFY_SOCKET is not set: the process was not started by systemd, or its unit lets it "
    "send nothing (set NotifyAccess=main or Type=notify)"
)
_NO_STORE_HINT = (
    "the unit has no fd store ($FDSTORE is not set): add FileDescriptorStoreMax=N and "
    "FileDescriptorStorePreserve=yes to its [Service] section"
)


def fdname_is_valid(name: str) -> bool:
    """Whether systemd accepts ``name`` as the name of a stored fd: printable
    ASCII without ``:`` (the separator of ``LISTEN_FDNAMES``), at most 255
    characters. systemd itself lets an empty name through, then stores the
    fd as "stored"; this check refuses it so that names round-trip."""
    if not isinstance(name, str) or not name or len(name) > FDNAME_MAX:
        return False
    return all(" " <= ch < "\x7f" and ch != ":" for ch in name)


def _check_fdname(name: Any, op: str, **args: Any) -> str:
    if not fdname_is_valid(name):
        raise make(
            errno.EINVAL,
            op,
            "an fd store name is 1 to 255 printable ASCII characters without ':'",
            name=name,
            **args,
        )
    return name


def notify_socket(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The socket address systemd gave in ``$NOTIFY_SOCKET``, or None."""
    env = os.environ if environ is None else environ
    return env.get("NOTIFY_SOCKET") or None


def _address(raw: str, op: str) -> str:
    """Turn ``$NOTIFY_SOCKET`` into an AF_UNIX address for sendmsg()."""
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


def _fileno(fd: Any, op: str) -> int:
    if isinstance(fd, bool):
        raise TypeError(f"{op}: expected an fd, not a bool")
    if isinstance(fd, int):
        return fd
    try:
        return fd.fileno()
    except AttributeError:
        raise TypeError(f"{op}: expected an int fd or an object with fileno(), not {type(fd).__name__}") from None


def notify(state: str, fds: Sequence[Any] = (), *, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to systemd,
    with ``fds`` attached (SCM_RIGHTS), like ``sd_pid_notify_with_fds``.

    Returns False, sending nothing, when ``$NOTIFY_SOCKET`` is not set (the
    process was not started by systemd), True once the datagram is sent. The
    fds stay open here: systemd receives duplicates.

    Raises OSError: EAFNOSUPPORT (a NOTIFY_SOCKET that is not AF_UNIX),
    ENAMETOOLONG, ENOENT/ECONNREFUSED (nobody listens there), EACCES, EBADF
    (an fd is not open), ETOOMANYREFS/EINVAL (too many fds), EAGAIN (systemd's
    queue is full)."""
    return _send(state, fds, environ, "notify")


def _send(state: str, fds: Sequence[Any], environ: Optional[Mapping[str, str]], op: str, **args: Any) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; errors name ``op`` and ``args``."""
    raw = notify_socket(environ)
    if raw is None:
        return False
    address = _address(raw, op)
    numbers = [_fileno(fd, op) for fd in fds]
    ancillary = []
    if numbers:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", numbers).tobytes()))
    payload = state.encode("utf-8", "surrogateescape")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            while True:
                try:
                    sock.sendmsg([payload], ancillary, 0, address)
                    break
                except InterruptedError:
                    continue
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            detail = "nobody listens on NOTIFY_SOCKET (systemd went away, or the variable is stale)"
            raise make(exc.errno, op, detail, NOTIFY_SOCKET=raw, **args) from None
        if exc.errno is None:
            # Python's own argument checks carry no errno.
            raise make(errno.EINVAL, op, str(exc), NOTIFY_SOCKET=raw, **args) from None
        raise wrap(exc, op, NOTIFY_SOCKET=raw, **args) from None
    return True


def _require_store(env: Mapping[str, str], op: str, **args: Any) -> None:
    if notify_socket(env) is None:
        raise make(errno.ENXIO, op, _NO_SOCKET_HINT, **args)
    # systemd >= 254 sets $FDSTORE to FileDescriptorStoreMax= when the store
    # is enabled; without it systemd would drop the fd with only a log line.
    size = env.get("FDSTORE", "")
    if not size.isdigit() or int(size) == 0:
        raise make(errno.ENOSPC, op, _NO_STORE_HINT, **args)


def store_fd(
    fd: Any,
    name: str,
    *,
    poll: bool = True,
    require_store: bool = True,
    environ: Optional[Mapping[str, str]] = None,
) -> None:
    """Push ``fd`` (an int or anything with ``fileno()``) into the fd store
    under ``name`` (``FDSTORE=1``, ``FDNAME=name``). systemd keeps a
    duplicate; this process keeps its own fd open.

    ``poll=False`` sends ``FDPOLL=0`` (systemd then does not drop the fd
    when it reports an error or hang-up). ``require_store`` refuses to send
    when ``$FDSTORE`` says the unit has no fd store, where systemd would
    drop the fd silently.

    Raises OSError: EINVAL (invalid name), ENXIO (no NOTIFY_SOCKET: not
    under systemd), ENOSPC (the unit has no fd store), and the errors of
    :func:`notify`."""
    env = os.environ if environ is None else environ
    number = _fileno(fd, "store_fd")
    _check_fdname(name, "store_fd", fd=number)
    if require_store:
        _require_store(env, "store_fd", fd=number, name=name)
    state = f"FDSTORE=1\nFDNAME={name}"
    if not poll:
        state += "\nFDPOLL=0"
    if not _send(state, [number], env, "store_fd", fd=number, name=name):
        raise make(errno.ENXIO, "store_fd", _NO_SOCKET_HINT, fd=number, name=name)


def store_session(
    session: Session,
    name: Optional[str] = None,
    *,
    require_store: bool = True,
    environ: Optional[Mapping[str, str]] = None,
) -> str:
    """Push a session's fd into the fd store, named ``name`` or, by default,
    after the session itself (so that :func:`find_sessions` and the name
    systemd hands back agree). Returns the name used. The Session stays
    open and usable here; systemd holds its own reference.

    Raises OSError: EINVAL (the name, or the session's name when none is
    given, is not a valid fd store name: pass ``name=``), EBADF (the session
    is closed), and the errors of :func:`store_fd`."""
    try:
        fd = session.fileno()
    except ValueError:
        raise make(errno.EBADF, "store_session", "the session is closed", session=repr(session)) from None
    if name is None:
        name = session.name
        if not fdname_is_valid(name):
            raise make(
                errno.EINVAL,
                "store_session",
                "the session's name is not a valid fd store name: pass name= (printable ASCII, no ':')",
                session=name,
            )
    store_fd(fd, name, require_store=require_store, environ=environ)
    return name


def remove_fd(name: str, *, environ: Optional[Mapping[str, str]] = None) -> None:
    """Ask systemd to close and forget every stored fd named ``name``
    (``FDSTOREREMOVE=1``). Dropping a session's last reference ends it: its
    files are no longer preserved.

    Raises OSError: EINVAL (invalid name), ENXIO (no NOTIFY_SOCKET), and the
    errors of :func:`notify`."""
    _check_fdname(name, "remove_fd")
    if not _send(f"FDSTOREREMOVE=1\nFDNAME={name}", (), environ, "remove_fd", name=name):
        raise make(errno.ENXIO, "remove_fd", _NO_SOCKET_HINT, name=name)


def barrier(timeout: float = 5.0, *, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Wait until systemd has processed every message sent before
    (``BARRIER=1``, as ``sd_notify_barrier``): call it after storing fds and
    before exiting, so none is lost with the process.

    Returns False when there is no NOTIFY_SOCKET, True once systemd is done.

    Raises OSError: ETIMEDOUT (no answer within ``timeout`` seconds), and the
    errors of :func:`notify`."""
    if notify_socket(environ) is None:
        return False
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            _send("BARRIER=1", [write_end], environ, "barrier")
        finally:
            # systemd closes its copy once it got this far; ours must go first
            # or the hang-up below could never come.
            os.close(write_end)
        poller = select.poll()
        poller.register(read_end, select.POLLHUP)
        if not poller.poll(max(0, int(timeout * 1000))):
            raise make(errno.ETIMEDOUT, "barrier", "systemd did not answer BARRIER=1", timeout=timeout)
    finally:
        os.close(read_end)
    return True


@dataclass(frozen=True)
class ListenFd:
    """An fd systemd passed to this process, with its ``LISTEN_FDNAMES`` name
    ("unknown" when systemd gave none)."""

    fd: int
    name: str


def _clear(env: MutableMapping[str, str]) -> None:
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)


def listen_fds(
    *,
    unset_environment: bool = False,
    environ: Optional[MutableMapping[str, str]] = None,
    pid: Optional[int] = None,
) -> List[ListenFd]:
    """The fds systemd passed (``LISTEN_FDS`` from fd 3 on, named by
    ``LISTEN_FDNAMES``), as ``sd_listen_fds_with_names`` finds them. Empty
    when ``LISTEN_PID`` is not this process (the variables were inherited
    from a parent). Marks each fd close-on-exec, as systemd's library does,
    so that they do not leak into children.

    Raises OSError: EINVAL (malformed variables, or a name count that is not
    the fd count), EBADF (a listed fd is not open)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    try:
        raw_pid = env.get("LISTEN_PID")
        if raw_pid is None:
            return []
        try:
            owner = int(raw_pid)
        except ValueError:
            raise make(errno.EINVAL, "listen_fds", "LISTEN_PID is not a number", LISTEN_PID=raw_pid) from None
        if owner != (os.getpid() if pid is None else pid):
            return []
        raw_count = env.get("LISTEN_FDS", "")
        if not raw_count.isdigit():
            raise make(errno.EINVAL, "listen_fds", "LISTEN_FDS is not a count", LISTEN_FDS=raw_count)
        count = int(raw_count)
        raw_names = env.get("LISTEN_FDNAMES")
        names = raw_names.split(":") if raw_names is not None else ["unknown"] * count
        if len(names) != count:
            raise make(
                errno.EINVAL,
                "listen_fds",
                "LISTEN_FDNAMES does not name every fd",
                LISTEN_FDS=raw_count,
                LISTEN_FDNAMES=raw_names,
            )
        found = []
        for offset, name in enumerate(names):
            fd = LISTEN_FDS_START + offset
            try:
                os.set_inheritable(fd, False)
            except OSError as exc:
                raise wrap(exc, "listen_fds", fd=fd, name=name) from None
            found.append(ListenFd(fd, name))
        return found
    finally:
        if unset_environment:
            _clear(env)


def find_sessions(
    *,
    unset_environment: bool = False,
    environ: Optional[MutableMapping[str, str]] = None,
    pid: Optional[int] = None,
) -> Dict[str, Session]:
    """The Live Update sessions among the fds systemd passed, keyed by the
    session's own name (asked with GET_NAME, whatever its fd store name).

    Each session fd is adopted (the returned Session owns it); every other
    fd is left alone, open, for the caller (see :func:`listen_fds`). Works
    for kernel session fds and for those of the emulators.

    When several fds belong to sessions of one name (the same session
    stored twice), the first is adopted and the others are left alone.

    Raises OSError: the errors of :func:`listen_fds`; any failure other than
    "not a session" (ENOTTY) of :meth:`Session.from_fd`."""
    sessions: Dict[str, Session] = {}
    try:
        for entry in listen_fds(unset_environment=unset_environment, environ=environ, pid=pid):
            try:
                session = Session.from_fd(entry.fd)
            except OSError as exc:
                if exc.errno == errno.ENOTTY:
                    continue
                raise
            name = session.name
            if name in sessions:
                session.detach()  # leave the duplicate open, like any other fd
                continue
            sessions[name] = session
    except BaseException:
        # Closing the sessions adopted so far would end them: hand their fds
        # back untouched so that the caller can still recover.
        for session in sessions.values():
            session.detach()
        raise
    return sessions
