"""What each client may make the service hold: memory and fds.

The kernel charges what a caller makes it allocate to that caller: the
pages a preserve pins to the caller's memory cgroup (ENOMEM past it), a new
session fd to the caller's own fd table (EMFILE when it is full, ENFILE
when the whole system's file table is). The service is one process holding
every client's sessions and preserved files, so without a budget of its
own one client could take all its memory or fds and make every other
client fail. Here each client (a process, known by its SO_PEERCRED pid and
start time) has an :class:`Account`; the :class:`Ledger` refuses a request
that would take an account past its share (ENOMEM, EMFILE) or the service
past its total (ENOMEM, ENFILE), before anything is allocated, and gives
the charge back when the kernel lets go of what it paid for.

What is charged:

* fds: 1 for every connection (its socket), 2 more for a device (the
  emulator's pipe behind the handle), 3 for a session (its socket pair end
  and the pipe), 1 for every preserved file (the kernel's reference,
  :mod:`liveupdate.emulator.kfile`);
* memory: for every preserved file, :func:`held_bytes` -- what the emulator
  really holds for it, not the file's apparent size.

A preserved file's charge follows the file, not the process: it crosses a
kexec with its session and is given back when the file is retrieved, its
session finished or released, or when the next kexec drops it unretrieved.
It stays with the account that preserved it (as a memory cgroup keeps its
charges), so a daemon that hands its session to another process still pays
for it.
"""
from __future__ import annotations

import errno
import os
import resource
from typing import Dict, NamedTuple, Optional, Tuple

__all__ = ["Limits", "Account", "Ledger", "held_bytes", "held_for_size", "default_limits", "raise_fd_limit", "parse_size",
           "FDS_PER_CONNECTION", "FDS_PER_DEVICE", "FDS_PER_SESSION", "FDS_PER_FILE"]

PAGE_SIZE = 4096
#: fds the service spends for what a client holds (see the module doc).
FDS_PER_CONNECTION = 1
FDS_PER_DEVICE = 2
FDS_PER_SESSION = 3
FDS_PER_FILE = 1
#: fds kept out of every budget for the service's own use: the listener,
#: the selector, the wake pipe, the spare fd, a log file, and the fds that
#: pass through it for one request (a preserved file arriving, a retrieved
#: one leaving, a new socket pair).
FD_HEADROOM = 64

def _bytes_per_page() -> int:
    """What the emulator holds for each page of a preserved memfd, holes
    included. Kept in runs (:mod:`liveupdate.emulator.folio_runs`): a byte
    a page says whether it is still there, and about as much again for the
    folio array's runs (2.09 MiB for a 4 GiB sparse memfd, measured in
    RSS on CPython 3.11). Before that, a FolioPage object per page, its slot and
    pfn key in the memory's page dict and its 16-byte record in the folio
    array: about 254 bytes a page, measured in RSS on CPython 3.11."""
    import importlib.util

    try:
        runs = importlib.util.find_spec("liveupdate.emulator.folio_runs") is not None
    except (ImportError, ValueError):
        runs = False
    return 2 if runs else 256


_BYTES_PER_PAGE = _bytes_per_page()
#: A file with no page still costs its 48-byte record, its KernelFile, the
#: runs that describe it and the bookkeeping around them.
_BYTES_PER_FILE = 1024


def held_bytes(st: os.stat_result) -> int:
    """The memory the emulator holds for preserving a file with status
    ``st``: the one place that knows how the emulator keeps preserved pages.

    Not the file's data: the pages a client wrote stay in its memfd, charged
    to the memory cgroup of whoever wrote them (the service holds a
    reference, not a copy), so only the emulator's own bookkeeping for them
    grows the service. That is proportional to the apparent size (the
    kernel records every page, holes included)."""
    return held_for_size(st.st_size)


def held_for_size(size: int) -> int:
    """:func:`held_bytes` for a file of ``size`` bytes."""
    pages = -(-max(size, 0) // PAGE_SIZE)
    if pages > 0xFFFFFFFF:
        # Above the kernel's folio cap the preserve fails with EFBIG before
        # anything is pinned: nothing to charge, and the kernel's errno wins.
        return _BYTES_PER_FILE
    return _BYTES_PER_FILE + pages * _BYTES_PER_PAGE


class Limits(NamedTuple):
    """The budgets, in bytes and fds. ``memory_total`` and ``fds_total``
    bound the whole service, the ``*_per_client`` ones each client."""

    memory_per_client: int
    memory_total: int
    fds_per_client: int
    fds_total: int

    def describe(self) -> Dict[str, int]:
        return dict(self._asdict())


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 30


def _fd_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def default_limits(memory_per_client: Optional[int] = None, memory_total: Optional[int] = None,
                   fds_per_client: Optional[int] = None, fds_total: Optional[int] = None) -> Limits:
    """The budgets for this machine, with any of them given explicitly:
    in all, a quarter of the physical memory and the soft RLIMIT_NOFILE
    less :data:`FD_HEADROOM`; each client, half of each total (so one
    greedy client leaves the others at least half, and a client can still
    hold the 2,000 sessions of the kernel's own stress selftest, 3 fds each,
    under a hard limit of 20,000).

    Raises OSError EINVAL for a negative budget, or a client's budget above
    the total."""
    mem_total = _physical_memory() // 4 if memory_total is None else memory_total
    fd_total = max(_fd_limit() - FD_HEADROOM, 1) if fds_total is None else fds_total
    limits = Limits(mem_total // 2 if memory_per_client is None else memory_per_client, mem_total,
                    max(fd_total // 2, 1) if fds_per_client is None else fds_per_client, fd_total)
    for name, value in limits._asdict().items():
        if value < 0:
            raise OSError(errno.EINVAL, f"budget {name}={value} is negative")
    if limits.memory_per_client > limits.memory_total:
        raise OSError(errno.EINVAL, f"memory per client {limits.memory_per_client} exceeds the total "
                                    f"{limits.memory_total}")
    if limits.fds_per_client > limits.fds_total:
        raise OSError(errno.EINVAL, f"fds per client {limits.fds_per_client} exceed the total {limits.fds_total}")
    return limits


def raise_fd_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard one: every session, device
    and preserved file of every client is an fd of this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # a number, so that the emulator can place its own fds high (see _host.kernel_fd)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"4096"`` (binary units, an optional ``iB``
    or ``B``) as bytes. Raises ValueError (for argparse) on anything else."""
    value = text.strip().upper()
    for suffix in ("IB", "B"):
        if value.endswith(suffix) and len(value) > len(suffix):
            value = value[: -len(suffix)]
            break
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = value[: len(value) - len(unit)]
    if not number.isascii() or not number.isdigit() or len(number) > 20:
        raise ValueError(f"not a size: {text!r} (a whole number with an optional K, M, G or T)")
    return int(number) * _UNITS[unit]


class Account:
    """What one client holds through the service right now."""

    __slots__ = ("key", "memory", "fds")

    def __init__(self, key: Tuple[int, int, int]) -> None:
        self.key = key  # (pid, uid, start time of the process)
        self.memory = 0
        self.fds = 0

    @property
    def pid(self) -> int:
        return self.key[0]

    def __repr__(self) -> str:
        return f"<account pid {self.pid}: {self.memory} bytes, {self.fds} fds>"


class Ledger:
    """Every account and the totals, checked before each charge."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.accounts: Dict[Tuple[int, int, int], Account] = {}
        self.memory = 0
        self.fds = 0
        #: (direction, session name) -> token -> (account, bytes) of every
        #: preserved file, which the ledger gives back when it goes.
        self.files: Dict[Tuple[str, bytes], Dict[int, Tuple[Account, int]]] = {}

    def account(self, pid: int, uid: int) -> Account:
        """The account of process ``pid`` (a new one if it holds nothing)."""
        key = (pid, uid, _start_time(pid))
        found = self.accounts.get(key)
        if found is None:
            found = self.accounts[key] = Account(key)
        return found

    def charge(self, account: Account, fds: int = 0, memory: int = 0, what: str = "") -> None:
        """Charge ``account``, or raise OSError before anything changes:
        ENOMEM (memory), EMFILE (the client's fds), ENFILE (the service's)."""
        limits = self.limits
        if memory and account.memory + memory > limits.memory_per_client:
            raise OSError(errno.ENOMEM, f"{what}: the client (pid {account.pid}) would hold {account.memory + memory} "
                                        f"bytes of the emulator service's memory, above its budget of "
                                        f"{limits.memory_per_client} (serve --memory-per-client)")
        if memory and self.memory + memory > limits.memory_total:
            raise OSError(errno.ENOMEM, f"{what}: the emulator service would hold {self.memory + memory} bytes for "
                                        f"its clients, above its budget of {limits.memory_total} (serve --memory-total)")
        if fds and account.fds + fds > limits.fds_per_client:
            raise OSError(errno.EMFILE, f"{what}: the client (pid {account.pid}) holds {account.fds} of the "
                                        f"emulator service's fds, its budget is {limits.fds_per_client} "
                                        f"(serve --fds-per-client)")
        if fds and self.fds + fds > limits.fds_total:
            raise OSError(errno.ENFILE, f"{what}: the emulator service holds {self.fds} fds for its clients, its "
                                        f"budget is {limits.fds_total} (serve --fds-total)")
        account.memory += memory
        account.fds += fds
        self.memory += memory
        self.fds += fds

    def refund(self, account: Account, fds: int = 0, memory: int = 0) -> None:
        """Give back what ``account`` was charged; forget it once it holds nothing."""
        fds = min(fds, account.fds)
        memory = min(memory, account.memory)
        account.fds -= fds
        account.memory -= memory
        self.fds -= fds
        self.memory -= memory
        if not account.fds and not account.memory and self.accounts.get(account.key) is account:
            del self.accounts[account.key]

    # -- the files the charges are for ------------------------------------------

    def record(self, session: Tuple[str, bytes], token: int, account: Account, memory: int) -> None:
        """A preserve charged to ``account`` succeeded: file its charge under
        the session (("outgoing", name)) and token, to be given back later."""
        self.files.setdefault(session, {})[token] = (account, memory)

    def has(self, session: Optional[Tuple[str, bytes]], token: int) -> bool:
        """Whether a preserve of ``token`` in ``session`` holds a charge."""
        return session is not None and token in self.files.get(session, {})

    def forget(self, session: Tuple[str, bytes], token: int) -> None:
        """The file went back to user space (retrieved): refund its charge."""
        charges = self.files.get(session)
        if charges is None or token not in charges:
            return
        account, memory = charges.pop(token)
        if not charges:
            del self.files[session]
        self.refund(account, FDS_PER_FILE, memory)

    def forget_session(self, session: Tuple[str, bytes]) -> None:
        """The session let go of all its files (released, finished)."""
        for account, memory in self.files.pop(session, {}).values():
            self.refund(account, FDS_PER_FILE, memory)

    def held(self, session: Optional[Tuple[str, bytes]], token: Optional[int] = None) -> int:
        """Bytes charged for the files of ``session`` (or for one token)."""
        charges = self.files.get(session) if session is not None else None
        if not charges:
            return 0
        if token is not None:
            return charges[token][1] if token in charges else 0
        return sum(memory for _, memory in charges.values())

    def kexec(self) -> None:
        """The kernel rebooted: the outgoing sessions' files are the new
        kernel's incoming ones; incoming files never retrieved are gone
        (the next kernel gets only what the old one preserved)."""
        for session in [key for key in self.files if key[0] == "incoming"]:
            self.forget_session(session)
        self.files = {("incoming", name): charges for (_, name), charges in self.files.items()}

    def describe(self) -> Dict[str, object]:
        return {
            "limits": self.limits.describe(),
            "memory": self.memory,
            "fds": self.fds,
            "clients": {str(acc.pid): {"memory": acc.memory, "fds": acc.fds} for acc in self.accounts.values()},
        }


def _start_time(pid: int) -> int:
    # A pid is reused once its process is gone; with the start time, a new
    # process never inherits the charges of an old one.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read(1024).rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0
