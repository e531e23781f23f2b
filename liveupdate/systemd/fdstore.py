"""A service's fd store: push fds into it, take them (and sessions) back.

systemd keeps what a service stores (``FDSTORE=1``) across restarts of the
service and, since v261, across a kexec, handing it back in ``LISTEN_FDS``
under the names it was stored with (``FDNAME=``). This module speaks the
store's side of the notify protocol and finds the Live Update sessions
among the fds that came back.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Any, Dict, List, Mapping, MutableMapping, Optional

from ..errors import make
from ..session import Session
from .listen import listen_fds
from .notify import DEFAULT_TIMEOUT, NO_SOCKET_HINT, deadline_after, fileno, send

__all__ = [
    "FDNAME_MAX",
    "FoundSessions",
    "fdname_is_valid",
    "store_fd",
    "store_session",
    "remove_fd",
    "find_sessions",
]

log = logging.getLogger("liveupdate")

#: The longest name systemd accepts for a stored fd.
FDNAME_MAX = 255
# The suffix of a carry's manifest (see carry.manifest_name).
_CARRY = ".carry"

_NO_STORE_HINT = (
    "the unit has no fd store ($FDSTORE is not set): add FileDescriptorStoreMax=N and "
    "FileDescriptorStorePreserve=yes to its [Service] section"
)


def fdname_is_valid(name: Any) -> bool:
    """Whether systemd accepts ``name`` as the name of a stored fd: printable
    ASCII without ``:`` (the separator of ``LISTEN_FDNAMES``), at most 255
    characters. systemd itself lets an empty name through, then stores the
    fd as "stored"; this check refuses it so that names round-trip."""
    if not isinstance(name, str) or not name or len(name) > FDNAME_MAX:
        return False
    return all(" " <= ch < "\x7f" and ch != ":" for ch in name)


def check_fdname(name: Any, op: str, **args: Any) -> str:
    if not fdname_is_valid(name):
        raise make(
            errno.EINVAL,
            op,
            "an fd store name is 1 to 255 printable ASCII characters without ':'",
            name=name,
            **args,
        )
    return str(name)


def store_capacity(env: Mapping[str, str]) -> int:
    """``$FDSTORE``: the unit's FileDescriptorStoreMax= as systemd (>= 254)
    tells the service, 0 when the unit has no store."""
    size = env.get("FDSTORE", "")
    if not (size.isascii() and size.isdigit()) or len(size) > 10:
        return 0
    return int(size)


def _require_store(env: Mapping[str, str], op: str, **args: Any) -> None:
    if env.get("NOTIFY_SOCKET") in (None, ""):
        raise make(errno.ENXIO, op, NO_SOCKET_HINT, **args)
    # Without a store systemd would drop the fd with only a log line.
    if store_capacity(env) == 0:
        raise make(errno.ENOSPC, op, _NO_STORE_HINT, **args)


def _push(state: str, number: int, op: str, require_store: bool, timeout: float,
          environ: Optional[Mapping[str, str]], **args: Any) -> None:
    env = os.environ if environ is None else environ
    deadline = deadline_after(timeout, op)
    if require_store:
        _require_store(env, op, **args)
    if not send(state, [number], env, op, deadline, **args):
        raise make(errno.ENXIO, op, NO_SOCKET_HINT, **args)


def store_fd(
    fd: Any,
    name: str,
    *,
    poll: bool = True,
    require_store: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    environ: Optional[Mapping[str, str]] = None,
) -> None:
    """Push ``fd`` (an int or anything with ``fileno()``) into the fd store
    under ``name`` (``FDSTORE=1``, ``FDNAME=name``). systemd keeps a
    duplicate; this process keeps its own fd open. systemd ignores an fd
    whose file it already stores, under any name.

    ``poll=False`` sends ``FDPOLL=0`` (systemd then does not drop the fd
    when it reports an error or hang-up). ``require_store`` refuses to send
    when ``$FDSTORE`` says the unit has no fd store, where systemd would
    drop the fd silently. ``timeout``: see :func:`notify`.

    Raises OSError: EINVAL (invalid name or timeout), ENXIO (no
    NOTIFY_SOCKET: not under systemd), ENOSPC (the unit has no fd store),
    and the errors of :func:`notify`."""
    number = fileno(fd, "store_fd")
    check_fdname(name, "store_fd", fd=number)
    state = f"FDSTORE=1\nFDNAME={name}" + ("" if poll else "\nFDPOLL=0")
    _push(state, number, "store_fd", require_store, timeout, environ, fd=number, name=name)


def store_session(
    session: Session,
    name: Optional[str] = None,
    *,
    require_store: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    environ: Optional[Mapping[str, str]] = None,
) -> str:
    """Push a session's fd into the fd store, named ``name`` or, by default,
    after the session itself. Returns the name used: the key under which
    :func:`find_sessions` hands the session back. The Session stays open
    and usable here; systemd holds its own reference.

    systemd carries the session through a kexec by its kernel name (the
    session is not nested in systemd's own): an *outgoing* session comes
    back *incoming* in the next kernel. An incoming session stored again
    does not survive a second kexec, because the kernel serializes only
    outgoing sessions: move its files into a new one with
    :func:`carry_session` on every boot.

    After a plain restart the session comes back outgoing and still
    preserves its files, but no command gives a file back from an outgoing
    session: to use the data after a restart, store the memfds themselves
    too (:func:`store_fd`), or keep only memfds in the fd store, which
    systemd preserves through every kexec by itself.

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
    store_fd(fd, name, require_store=require_store, timeout=timeout, environ=environ)
    return name


def remove_fd(name: str, *, timeout: float = DEFAULT_TIMEOUT,
              environ: Optional[Mapping[str, str]] = None) -> None:
    """Ask systemd to close and forget every stored fd named ``name``
    (``FDSTOREREMOVE=1``). Dropping a session's last reference ends it: its
    files are no longer preserved.

    Raises OSError: EINVAL (invalid name or timeout), ENXIO (no
    NOTIFY_SOCKET), and the errors of :func:`notify`."""
    check_fdname(name, "remove_fd")
    deadline = deadline_after(timeout, "remove_fd")
    if not send(f"FDSTOREREMOVE=1\nFDNAME={name}", (), environ, "remove_fd", deadline, name=name):
        raise make(errno.ENXIO, "remove_fd", NO_SOCKET_HINT, name=name)


class FoundSessions(Dict[str, Session]):
    """What :func:`find_sessions` returns: a dict of fd store name to
    :class:`~liveupdate.Session`, plus

    ``failed``
        the fds that are Live Update sessions (or look like one) but could
        not be adopted, by fd store name, with the error. Those fds are left
        open for the caller.
    ``unfinished``
        the names whose :func:`carry_session` was cut short (its manifest,
        ``NAME.carry``, is in the store): call ``carry_session`` for each
        again, with the session found under that name or None."""

    failed: Dict[str, OSError]
    unfinished: List[str]

    def __init__(self) -> None:
        super().__init__()
        self.failed = {}
        self.unfinished = []


def find_sessions(
    *,
    unset_environment: bool = False,
    environ: Optional[MutableMapping[str, str]] = None,
    pid: Optional[int] = None,
) -> FoundSessions:
    """The Live Update sessions among the fds systemd passed, keyed by their
    fd store name: the ``name`` given to :func:`store_session`, or the name
    of a unit's ``LUOSession=NAME``. (The kernel's name of a session, which
    for ``LUOSession=`` is derived from the unit's name, is ``Session.name``.)

    Each session fd is adopted (the returned Session owns it) and knows
    whether it is ``"outgoing"`` (made in this kernel: after a first start
    or a plain restart) or ``"incoming"`` (handed over by the previous
    kernel): see :attr:`Session.state`. Every other fd is left alone, open,
    for the caller (see :func:`listen_fds`).

    One bad fd does not hide the others: a session fd that cannot be
    adopted (a stopped emulator service, a stale emulated handle, a socket
    that only looks like a session) is left open and listed in the
    result's ``failed`` dict with its error, and logged at WARNING on the
    ``liveupdate`` logger. When several fds of one name are sessions, the
    first is adopted and the others are left alone.

    Raises OSError: the errors of :func:`listen_fds`."""
    sessions = FoundSessions()
    entries = listen_fds(unset_environment=unset_environment, environ=environ, pid=pid)
    sessions.unfinished = sorted({entry.name[: -len(_CARRY)] for entry in entries
                                  if entry.name.endswith(_CARRY) and len(entry.name) > len(_CARRY)})
    for entry in entries:
        if entry.name in sessions:
            continue
        try:
            session = Session.from_fd(entry.fd)
        except OSError as exc:
            if exc.errno == errno.ENOTTY:
                continue  # not a session of any backend: the caller's fd
            sessions.failed.setdefault(entry.name, exc)
            log.warning("fd %d (%r) from systemd's fd store is not a usable session: %s",
                        entry.fd, entry.name, exc)
            continue
        sessions[entry.name] = session
    return sessions
