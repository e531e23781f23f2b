"""The emulator's port: real fds of this process in front of the emulated kernel.

The public API talks to a kernel through ``open_device``, ``ioctl`` and
``close`` (:mod:`liveupdate._port`). This port answers them from an
:class:`~liveupdate.emulator.Emulator`:

* **Handles are real fds.** The device fd and every session fd is the
  write end of a close-on-exec pipe whose read end the emulator keeps. A
  handle is found by its inode (``fstat``: device and inode number), so any
  dup of it, inherited or passed with SCM_RIGHTS, is the same handle. When
  the last copy of the write end is closed, by anyone, the read end reports
  a hang-up: that is the kernel's ``release()``. The port checks it in
  :meth:`EmulatorPort.close`, and, for handles closed with a bare
  ``os.close``, before the operations whose answer a pending release would
  change (a create of a taken name, a preserve of a held file, a retrieve
  of a retrieved session, an open of a held device) and at every kexec.
  The read end is kept out of the program's fd numbers
  (:func:`._host.kernel_pipe`): a session costs the caller one fd, as on
  the kernel.
* **fds inside the structs are the caller's fds**: preserve keeps its own
  duplicate of the caller's file (the kernel's reference); retrieve installs
  a new close-on-exec fd.
* **Stale handles**: after :meth:`Emulator.kexec` the handles of the
  replaced kernel answer every ioctl with ESTALE
  (:class:`liveupdate.errors.StaleHandleError` through the public API).

Anything else: an fd that is not one of this emulator's handles gets ENOTTY
(what the kernel says to an ioctl a file does not know), a closed fd EBADF.
The port serialises calls with one lock, so a multi-threaded host (the
emulator service) may share it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import threading
import weakref
from typing import Any, Dict, Iterable, List, Optional, Protocol, Tuple

from .. import _port
from . import _host
from .luo_core import Kernel
from .luo_session import LuoSession

__all__ = ["EmulatorPort", "Handle"]

Key = Tuple[int, int]


class Machine(Protocol):
    """What the port uses of its :class:`~liveupdate.emulator.Emulator`: the
    running kernel (None after a panic). Named here, not imported, so that
    the emulator package, which builds on this module, is not imported back."""

    kernel: Optional[Kernel]


class Handle:
    """One open device or session file of the emulated kernel."""

    __slots__ = ("kind", "kernel", "session", "rfd", "key")

    def __init__(self, kind: str, kernel: Kernel, session: Optional["LuoSession"], rfd: int, key: Key) -> None:
        self.kind = kind
        self.kernel = kernel
        self.session = session
        self.rfd = rfd
        self.key = key

    def __repr__(self) -> str:
        what = self.kind if self.session is None else repr(self.session)
        return f"<handle {what} ino={self.key[1]}>"


def _pipe() -> Tuple[int, int]:
    # The write end is the caller's handle (the kernel allocates one fd);
    # the read end is the emulator's own, kept out of the caller's budget.
    return _host.kernel_pipe()


_close_own = os.close


def _hung_up(rfds: Iterable[int]) -> List[int]:
    """The read ends among ``rfds`` whose write ends are all closed."""
    poller = select.poll()
    for rfd in rfds:
        poller.register(rfd, select.POLLIN)
    return [fd for fd, events in poller.poll(0) if events & (select.POLLHUP | select.POLLERR)]


class _Fds:
    """get_unused_fd()/fd_install() for one ioctl call (a luo_core.FdTable)."""

    __slots__ = ("port", "kernel", "caller_fd", "pending")

    def __init__(self, port: "EmulatorPort", kernel: Kernel, caller_fd: int) -> None:
        self.port = port
        self.kernel = kernel
        self.caller_fd = caller_fd
        self.pending: Dict[int, int] = {}

    def reserve_session_fd(self) -> int:
        rfd, wfd = _pipe()
        self.pending[wfd] = rfd
        return wfd

    def install_session(self, fd: int, session: "LuoSession") -> None:
        rfd = self.pending.pop(fd)
        self.port._register("session", self.kernel, session, rfd, fd)

    def reserve_file_fd(self) -> int:
        # Any fd of ours will do as a placeholder: fd_install replaces it.
        return fcntl.fcntl(self.caller_fd, fcntl.F_DUPFD_CLOEXEC, 0)

    def install_file(self, fd: int, file: Any) -> None:
        if file.fd >= 0:
            os.dup2(file.fd, fd, inheritable=False)
            return
        source = _host.kernel_fd(file.new_fd)
        try:
            os.dup2(source, fd, inheritable=False)
        finally:
            os.close(source)

    def put_unused_fd(self, fd: int) -> None:
        rfd = self.pending.pop(fd, None)
        if rfd is not None:
            _close_own(rfd)
        os.close(fd)


class EmulatorPort:
    """The port of one :class:`~liveupdate.emulator.Emulator` (see module doc)."""

    kind = "emulator"

    def __init__(self, emulator: Machine) -> None:
        self._emulator = weakref.ref(emulator)
        self.lock = threading.RLock()
        self.handles: Dict[Key, Handle] = {}
        _ports.add(self)

    @property
    def emulator(self) -> Machine:
        emu = self._emulator()
        if emu is None:
            raise OSError(errno.ENODEV, "the emulator behind this port is gone")
        return emu

    # -- the port contract -------------------------------------------------------------
    def open_device(self, path: str) -> int:
        """Open the emulated device. Raises OSError: EBUSY (held: by a
        handle whose fds are all closed only until the port notices), EIO
        (the incoming sessions failed to restore), ENODEV (the emulated
        kernel panicked)."""
        with self.lock:
            kernel = self._kernel()
            if kernel.in_use:
                self.reap()
            rfd, wfd = _pipe()
            try:
                kernel.open()
            except BaseException:
                _close_own(rfd)
                os.close(wfd)
                raise
            self._register("device", kernel, None, rfd, wfd)
            return wfd

    def ioctl(self, fd: int, cmd: int, arg: bytes) -> bytes:
        """An ioctl on a device or session fd of this emulator; the
        argument struct as the kernel leaves it. Raises OSError with the
        kernel's errno, ESTALE for handles of a replaced kernel."""
        if not isinstance(arg, (bytes, bytearray, memoryview)):
            raise OSError(errno.EFAULT, "the argument must be the struct's bytes")
        arg = bytes(arg)
        cmd &= 0xFFFFFFFF  # ioctl(2) takes an unsigned int request
        with self.lock:
            handle = self._lookup(fd)
            kernel = handle.kernel
            fds = _Fds(self, kernel, fd)
            try:
                return self._dispatch(handle, cmd, arg, fds)
            except OSError as exc:
                # A session or device released by a bare os.close() that the
                # port has not noticed yet would change exactly these answers.
                if exc.errno in (errno.EEXIST, errno.EBUSY, errno.EINVAL) and self.reap():
                    return self._dispatch(self._lookup(fd), cmd, arg, fds)
                raise

    def close(self, fd: int) -> None:
        """Close ``fd``; if it was the last fd of a handle, release it (an
        outgoing session unpreserves its files, an incoming one finishes)."""
        with self.lock:
            try:
                st = os.fstat(fd)
            except OSError:
                os.close(fd)  # raises EBADF as close(2) would
                return
            handle = self.handles.get((st.st_dev, st.st_ino))
            os.close(fd)
            if handle is not None and (handle.rfd < 0 or _hung_up([handle.rfd])):
                self._release(handle)

    # -- handles ------------------------------------------------------------------------
    def _kernel(self) -> Kernel:
        kernel = self.emulator.kernel
        if kernel is None:
            raise OSError(errno.ENODEV, "the emulated kernel panicked at boot; create a new Emulator")
        return kernel

    def _register(self, kind: str, kernel: Kernel, session: Optional["LuoSession"], rfd: int, wfd: int) -> None:
        st = os.fstat(wfd)
        key = (st.st_dev, st.st_ino)
        self.handles[key] = Handle(kind, kernel, session, rfd, key)

    def _lookup(self, fd: int) -> Handle:
        st = os.fstat(fd)  # EBADF for a closed fd, as the kernel says
        handle = self.handles.get((st.st_dev, st.st_ino))
        if handle is None:
            raise OSError(errno.ENOTTY, f"fd {fd} is not a device or session of this emulator")
        if not handle.kernel.alive:
            raise OSError(
                errno.ESTALE,
                f"fd {fd} is a {handle.kind} of the emulated kernel #{handle.kernel.liveupdate_num}, which an "
                f"emulated kexec replaced; open the device again (retrieve_session for what was handed over)",
            )
        return handle

    def _dispatch(self, handle: Handle, cmd: int, arg: bytes, fds: _Fds) -> bytes:
        if handle.session is None:
            return handle.kernel.device_ioctl(cmd, arg, fds)
        if handle.session.released:
            raise OSError(errno.EBADF, "the session was released")
        return handle.kernel.session_ioctl(handle.session, cmd, arg, fds)

    def _release(self, handle: Handle) -> None:
        if self.handles.get(handle.key) is handle:
            del self.handles[handle.key]
        if handle.rfd >= 0:
            _close_own(handle.rfd)
            handle.rfd = -1
        if not handle.kernel.alive:
            return
        if handle.session is None:
            handle.kernel.release()
        else:
            handle.kernel.release_session(handle.session)

    def reap(self) -> int:
        """Release every handle whose fds have all been closed; how many."""
        with self.lock:
            if not self.handles:
                return 0
            by_rfd = {handle.rfd: handle for handle in self.handles.values() if handle.rfd >= 0}
            dead = _hung_up(by_rfd)
            for rfd in dead:
                self._release(by_rfd[rfd])
            return len(dead)

    def retire(self, kernel: Kernel) -> None:
        """After a kexec: the handles of ``kernel`` stay known (to answer
        ESTALE) but stop holding a read end each. Pipe inode numbers come
        from a 32-bit counter, so a key is not reused before billions of
        pipes later; the entry goes when the port closes the fd."""
        with self.lock:
            for handle in self.handles.values():
                if handle.kernel is kernel and handle.rfd >= 0:
                    _close_own(handle.rfd)
                    handle.rfd = -1

    def owns(self, fd: int) -> bool:
        """True if ``fd`` is a handle (live or stale) of this emulator."""
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self.handles

    def __repr__(self) -> str:
        return f"<liveupdate port: emulator, {len(self.handles)} open handles>"


_ports: "weakref.WeakSet[EmulatorPort]" = weakref.WeakSet()


def _recognize(fd: int, link: str) -> Optional[EmulatorPort]:
    if not link.startswith("pipe:"):
        return None
    for port in list(_ports):
        if port.owns(fd):
            return port
    return None


_port.register_recognizer(_recognize)
