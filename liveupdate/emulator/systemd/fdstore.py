"""A service's fd store, as systemd 262 keeps it (service_add_fd_store(),
service_remove_fd_store() and the notify message that drives them).

Measured on systemd 262.1 (the systemd tier) where the manual is silent:

- the store is a list, newest entry first, and that is the order of
  ``LISTEN_FDS`` after a restart;
- an fd of a file already in the store is ignored, whatever its name;
- in one message ``FDSTORE=1`` is handled before ``FDSTOREREMOVE=1``, so the
  pair removes the new fd with the old ones;
- an fd stored with ``FDPOLL`` on (the default) is dropped once it reports
  POLLHUP or POLLERR (a pipe or socket whose peer went away);
- a full store drops the new fd with a warning ("Hit fd store limit").

Where the emulation differs from systemd: systemd compares two fds with
kcmp() (the same open file); here two fds are the same when they are the
same inode with the same ``/proc`` link, which for memfds, sessions and
regular files gives the same answers.
"""
from __future__ import annotations

import logging
import os
import select
from dataclasses import dataclass
from typing import List, Tuple

__all__ = ["FdStore", "StoreEntry"]

log = logging.getLogger("liveupdate.emulator.systemd")


@dataclass
class StoreEntry:
    name: str
    fd: int
    poll: bool


def _identity(fd: int) -> Tuple[int, int, str]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, os.readlink(f"/proc/self/fd/{fd}")


class FdStore:
    """One service's stored fds. The fds belong to the store (to the
    manager's process), as the real ones belong to PID 1."""

    def __init__(self, unit: str, capacity: int) -> None:
        self.unit = unit
        self.capacity = capacity
        self.entries: List[StoreEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> List[str]:
        return [entry.name for entry in self.entries]

    def add(self, fd: int, name: str, poll: bool = True) -> bool:
        """Take ``fd`` (owned by the store from now on, kept or closed).
        Returns whether it was stored."""
        try:
            identity = _identity(fd)
            if any(_identity(entry.fd) == identity for entry in self.entries):
                os.close(fd)
                return False
        except OSError:
            os.close(fd)
            return False
        if len(self.entries) >= self.capacity:
            log.warning("%s: Hit fd store limit, dropping fd %r.", self.unit, name)
            os.close(fd)
            return False
        self.entries.insert(0, StoreEntry(name, fd, poll))
        return True

    def remove(self, name: str) -> int:
        """Drop (close) every entry named ``name``; returns how many."""
        gone = [entry for entry in self.entries if entry.name == name]
        for entry in gone:
            self.entries.remove(entry)
            os.close(entry.fd)
        return len(gone)

    def drop_hung_up(self) -> List[str]:
        """Drop the polled entries that report POLLHUP or POLLERR, as
        systemd's event loop does when they fire."""
        polled = [entry for entry in self.entries if entry.poll]
        if not polled:
            return []
        poller = select.poll()
        for entry in polled:
            poller.register(entry.fd, select.POLLHUP | select.POLLERR)
        dead = {fd for fd, events in poller.poll(0) if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)}
        dropped = []
        for entry in [e for e in polled if e.fd in dead]:
            self.entries.remove(entry)
            os.close(entry.fd)
            dropped.append(entry.name)
        return dropped

    def listen(self) -> Tuple[List[int], List[str]]:
        """The fds and names a starting service gets, in order."""
        return [entry.fd for entry in self.entries], [entry.name for entry in self.entries]

    def take_all(self) -> List[StoreEntry]:
        """Empty the store, handing its entries (and their fds) over."""
        entries, self.entries = self.entries, []
        return entries

    def release(self) -> None:
        for entry in self.take_all():
            os.close(entry.fd)
