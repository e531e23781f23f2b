"""A host file held by the emulated kernel: the emulator's ``struct file *``.

The kernel keeps a reference to every preserved file (``fget`` at preserve,
``fput`` at unpreserve or finish) and to every file it hands back on
retrieve. The emulator does the same with a private duplicate of a real fd
of this process, counted like the kernel counts file references: the fd is
closed when the last emulated reference goes.

A dup shares the *open file description* with the caller's fd, so the
position the kernel reads at freeze is the caller's position, and a second
retrieve of the same file gives another fd of the same description, as
``get_file()`` does in the kernel.

Holding files without fds. The kernel holds file references without using
any of the process's fds, so a program may preserve 100,000 memfds and close
its own fds, or preserve with no fd left at all. The emulator keeps its own
fds above the program's soft ``RLIMIT_NOFILE`` (see
:func:`._host.kernel_fd`), so they do not eat the program's budget. Once the
files it holds as fds reach half of the *hard* limit (:func:`fd_budget`), a
new reference is kept as a one-page private read-only mapping of the file
instead: the mapping pins the inode (its pages, size and seals) without an
fd, and ``/proc/self/map_files`` reopens it when the emulator needs to read
it (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE; without them every
reference is an fd). Mappings are capped too (:func:`map_budget`, a quarter
of vm.max_map_count, since every map counts against the process's cap);
past both budgets references are fds again, until the process runs out of
them (EMFILE). So one process holds about ``hard RLIMIT_NOFILE/2 +
max_map_count/4`` files (26,000 with a hard limit of 20,000 and the default
map count); 100,000 preserved files in one emulated kernel need a higher
hard limit. Differences of a mapped reference, the emulator's and not the
kernel's: the position is the one at preserve (changes made later through
the caller's fds are not seen at freeze), and a repeated retrieve gives a
new open of the same memfd at the recorded position rather than another fd
of the same open file description.
"""
from __future__ import annotations

import errno
import fcntl
import os
import resource
from typing import Any, Optional, Tuple

import cffi

__all__ = ["KernelFile", "fd_budget", "map_budget", "held_fds"]

_ffi = cffi.FFI()
_ffi.cdef("void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);"
          "int munmap(void *addr, size_t length);")
_libc: Any = _ffi.dlopen(None)  # mmap() and munmap(), as declared above
_PROT_READ = 0x1
_MAP_PRIVATE = 0x02
_MAP_FAILED = 2**64 - 1 if _ffi.sizeof("void *") == 8 else 2**32 - 1
_MAPLEN = 4096
_O_PATH = getattr(os, "O_PATH", 0o10000000)

#: fds held by KernelFiles right now (the mapped ones hold none).
_held = 0
#: mapped references right now, and how many the process may afford: each
#: is a memory map of its own, and the kernel caps a process's maps
#: (vm.max_map_count, 65530 by default) for every allocation it makes.
_mapped_count = 0
_map_budget: Optional[int] = None
_map_files_ok: Optional[bool] = None


def map_budget() -> int:
    """How many file references may be mappings: a quarter of
    vm.max_map_count, leaving the rest to the program and its allocator."""
    global _map_budget
    if _map_budget is None:
        try:
            with open("/proc/sys/vm/max_map_count") as src:
                _map_budget = int(src.read()) // 4
        except (OSError, ValueError):
            _map_budget = 0
    return _map_budget


def held_fds() -> int:
    """How many fds the emulator holds for file references."""
    return _held


def fd_budget() -> int:
    """How many file references may be fds: half the hard fd limit (the
    emulator keeps its fds above the soft limit, see _host.kernel_fd)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return (hard if hard != resource.RLIM_INFINITY else 1 << 20) // 2


def _map(fd: int) -> Optional[int]:
    addr = _libc.mmap(_ffi.NULL, _MAPLEN, _PROT_READ, _MAP_PRIVATE, fd, 0)
    value = int(_ffi.cast("uintptr_t", addr))
    return None if value == _MAP_FAILED else value


def _map_files_usable() -> bool:
    global _map_files_ok
    if _map_files_ok is None:
        probe = os.memfd_create("liveupdate-emulator:probe", os.MFD_CLOEXEC)
        addr = _map(probe)
        ok = False
        if addr is not None:
            try:
                os.close(os.open(f"/proc/self/map_files/{addr:x}-{addr + _MAPLEN:x}", os.O_RDONLY | os.O_CLOEXEC))
                ok = True
            except OSError:
                pass
            _libc.munmap(_ffi.cast("void *", addr), _MAPLEN)
        os.close(probe)
        _map_files_ok = ok
    return _map_files_ok


class KernelFile:
    """A counted reference to a host file: an fd (``fd >= 0``) or a mapping
    (``fd == -1``, ``addr`` set). ``ident`` is (st_dev, st_ino), ``st`` the
    stat at the time of the first reference, ``fs_magic`` its file system."""

    __slots__ = ("fd", "refs", "addr", "pos", "ident", "st", "fs_magic", "spare", "__weakref__")

    def __init__(self, fd: int, st: Optional[os.stat_result] = None) -> None:
        global _held
        self.fd = fd
        self.refs = 1
        self.addr = 0
        self.pos = 0
        self.spare = -1
        self.st = st if st is not None else os.fstat(fd)
        self.ident: Tuple[int, int] = (self.st.st_dev, self.st.st_ino)
        self.fs_magic = 0
        _held += 1

    @classmethod
    def fget(cls, fd: int) -> "KernelFile":
        """Take a reference on the file behind the caller's ``fd``.

        Raises OSError: EBADF if ``fd`` is not an open descriptor; EMFILE if
        the process has no fd left for the emulator's copy."""
        from . import _host

        if fd < 0:
            raise OSError(errno.EBADF, "bad file descriptor")
        # fget() does not return O_PATH files: for the kernel they are no
        # open file to take a reference on.
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise OSError(errno.EBADF, f"fd {fd} is not open") from None
            raise
        if flags & _O_PATH:
            raise OSError(errno.EBADF, f"fd {fd} is an O_PATH descriptor, not an open file")
        st = os.fstat(fd)
        if _held >= fd_budget() and _mapped_count < map_budget() and _map_files_usable():
            addr = _map(fd)
            if addr is not None:
                file = cls._mapped(addr, st)
                try:
                    file.pos = os.lseek(fd, 0, os.SEEK_CUR)
                except OSError:
                    file.pos = 0
                file.fs_magic = _host.fs_magic(fd, st.st_dev)
                return file
        # Close-on-exec: the emulator's references must not leak into children.
        file = cls(_host.kernel_dup(fd), st)
        file.fs_magic = _host.fs_magic(fd, st.st_dev)
        return file

    @classmethod
    def _mapped(cls, addr: int, st: os.stat_result) -> "KernelFile":
        global _mapped_count
        _mapped_count += 1
        file = cls.__new__(cls)
        file.fd = -1
        file.refs = 1
        file.spare = -1
        file.addr = addr
        file.pos = 0
        file.st = st
        file.ident = (st.st_dev, st.st_ino)
        file.fs_magic = 0
        return file

    @classmethod
    def adopt(cls, fd: int) -> "KernelFile":
        """Make a new file the emulator opened (a retrieved memfd; opened
        with :func:`_host.kernel_fd`) a kernel reference, as a mapping
        when fds are scarce (``fd`` is then kept only until the first
        :meth:`new_fd`, which hands it out: the first retrieve's fd is then
        that open file, as in the kernel)."""
        st = os.fstat(fd)
        if _held >= fd_budget() and _mapped_count < map_budget() and _map_files_usable():
            addr = _map(fd)
            if addr is not None:
                file = cls._mapped(addr, st)
                file.pos = os.lseek(fd, 0, os.SEEK_CUR)
                file.spare = fd
                return file
        return cls(fd, st)

    def get(self) -> "KernelFile":
        self.refs += 1
        return self

    def put(self) -> None:
        global _held, _mapped_count
        self.refs -= 1
        if self.refs:
            return
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _held -= 1
            os.close(fd)
        elif self.addr:
            addr, self.addr = self.addr, 0
            _mapped_count -= 1
            _libc.munmap(_ffi.cast("void *", addr), _MAPLEN)
        if self.spare >= 0:
            spare, self.spare = self.spare, -1
            os.close(spare)

    @property
    def alive(self) -> bool:
        return self.fd >= 0 or bool(self.addr)

    def borrow(self) -> int:
        """An fd of the file to use now; hand it back with :meth:`give_back`."""
        if self.fd >= 0:
            return self.fd
        if not self.addr:
            raise OSError(errno.EBADF, "the file reference was released")
        from . import _host

        path = f"/proc/self/map_files/{self.addr:x}-{self.addr + _MAPLEN:x}"
        return _host.kernel_fd(lambda: os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def give_back(self, fd: int) -> None:
        if fd != self.fd:
            os.close(fd)

    def position(self) -> int:
        """The file position now (fd form) or as recorded (mapped form)."""
        return os.lseek(self.fd, 0, os.SEEK_CUR) if self.fd >= 0 else self.pos

    def new_fd(self) -> int:
        """A new close-on-exec fd of this file for user space (fd_install)."""
        if self.fd >= 0:
            return fcntl.fcntl(self.fd, fcntl.F_DUPFD_CLOEXEC, 0)
        if self.spare >= 0:
            fd, self.spare = self.spare, -1
            return fd
        fd = self.borrow()
        os.lseek(fd, self.pos, os.SEEK_SET)
        return fd

    def __repr__(self) -> str:
        form = f"fd={self.fd}" if self.fd >= 0 else f"mapped at {self.addr:#x}"
        return f"<KernelFile {form} ino={self.ident[1]} refs={self.refs}>"
