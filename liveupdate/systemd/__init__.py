"""Live Update under systemd: the fd store, the sessions in it, and what a
service does on each boot to keep its files through every kexec.

systemd (since v261) carries a service's fd store through a kexec live
update (``FileDescriptorStorePreserve=yes``): a plain memfd stored with
:func:`store_fd` is preserved in systemd's own session and handed back
after the kexec, under its name, in ``LISTEN_FDS``. A session fd stored
with :func:`store_session` is handed over by the kernel as a session of its
own and comes back *incoming*. Since v262, ``LUOSession=NAME`` makes systemd
create a session for the service and put it in the store under ``NAME``.
This module speaks that protocol in Python, without libsystemd::

    # on every start of the service
    found = systemd.find_sessions()         # {"cache": Session, ...} by fd store name
    session = found.get("cache")
    if "cache" in found.unfinished or (session and session.state == "incoming"):
        # after a kexec (or a carry a crash cut short): the files are back;
        # move them into a new session so that they reach the next kernel too
        carried = systemd.carry_session(session, [1], name="cache")
        session, fds = carried.session, carried.fds
    elif session is None:                   # first start: make one
        session = dev.create_session("cache")
        session.preserve(memfd, 1)
        systemd.store_session(session, "cache")
        systemd.barrier()
    # else "outgoing": a plain restart; the session still preserves its files

The unit needs ``FileDescriptorStoreMax=`` (how many fds it may store),
``FileDescriptorStorePreserve=yes`` (keep the store while the service is
stopped or restarting, and through a kexec) and a ``NotifyAccess=`` that
lets the process send (``Type=notify`` implies ``main``).
"""
from __future__ import annotations

from .carry import Carried, carry_session, manifest_name, parked_name, unfinished_carries
from .fdstore import (
    FDNAME_MAX,
    FoundSessions,
    fdname_is_valid,
    find_sessions,
    remove_fd,
    store_fd,
    store_session,
)
from .listen import LISTEN_FDS_START, ListenFd, listen_fds
from .notify import barrier, notify, notify_socket

__all__ = [
    "LISTEN_FDS_START",
    "FDNAME_MAX",
    "ListenFd",
    "FoundSessions",
    "Carried",
    "fdname_is_valid",
    "notify_socket",
    "notify",
    "store_fd",
    "store_session",
    "remove_fd",
    "barrier",
    "listen_fds",
    "find_sessions",
    "carry_session",
    "parked_name",
    "manifest_name",
    "unfinished_carries",
]
