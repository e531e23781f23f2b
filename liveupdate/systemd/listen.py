"""The fds systemd passes to a service: ``LISTEN_PID``, ``LISTEN_FDS``,
``LISTEN_FDNAMES``, read as ``sd_listen_fds_with_names`` reads them.

The variables are input from outside the process: a parent may have left
stale ones, a wrapper may have mangled them. Only ASCII digits count as
digits, a count is bounded by what the process could have open, and the
passed fds are made close-on-exec before anything is checked, so that no
error leaks them into children.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import List, MutableMapping, Optional

from ..errors import make

__all__ = ["LISTEN_FDS_START", "ListenFd", "listen_fds"]

#: systemd passes fds from 3 on, in order (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class ListenFd:
    """An fd systemd passed to this process, with its ``LISTEN_FDNAMES`` name
    ("unknown" when systemd gave none)."""

    fd: int
    name: str


def _number(env: MutableMapping[str, str], key: str) -> int:
    raw = env.get(key, "")
    if not _DIGITS.fullmatch(raw):
        raise make(errno.EINVAL, "listen_fds", f"{key} is not a number (ASCII digits)", **{key: raw[:40]})
    return int(raw)


def _most_fds() -> int:
    """How many fds this process could possibly hold (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            return int(f.read(32))
    except (OSError, ValueError):
        return 1 << 20


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
    from a parent). Each fd is marked close-on-exec first, as systemd's
    library does, so that none leaks into children, even when the rest of
    the variables turn out to be wrong.

    Calling it again returns the same list (unless ``unset_environment``
    removed the variables); the fds stay the caller's.

    Raises OSError: EINVAL (malformed variables, a count larger than any
    process could hold, or a name count that is not the fd count), EBADF (a
    listed fd is not open)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    try:
        if env.get("LISTEN_PID") is None:
            return []
        owner = _number(env, "LISTEN_PID")
        if owner != (os.getpid() if pid is None else pid):
            return []
        count = _number(env, "LISTEN_FDS")
        if count > _most_fds() - LISTEN_FDS_START:
            raise make(errno.EINVAL, "listen_fds", "LISTEN_FDS is more fds than a process can have open",
                       LISTEN_FDS=env.get("LISTEN_FDS"))
        closed = []
        for offset in range(count):
            fd = LISTEN_FDS_START + offset
            try:
                os.set_inheritable(fd, False)
            except OSError:
                closed.append(fd)
        raw_names = env.get("LISTEN_FDNAMES")
        if raw_names is None:
            names = ["unknown"] * count
        else:
            # "" is no name at all (LISTEN_FDS=0), not one empty name.
            names = raw_names.split(":") if raw_names else []
        if len(names) != count:
            raise make(errno.EINVAL, "listen_fds", "LISTEN_FDNAMES does not name every fd",
                       LISTEN_FDS=count, LISTEN_FDNAMES=raw_names[:200] if raw_names else raw_names)
        if closed:
            raise make(errno.EBADF, "listen_fds", "systemd said it passed this fd, but it is not open",
                       fd=closed[0], name=names[closed[0] - LISTEN_FDS_START])
        return [ListenFd(LISTEN_FDS_START + offset, name) for offset, name in enumerate(names)]
    finally:
        if unset_environment:
            _clear(env)
