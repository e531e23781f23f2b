"""The device and the kernel's life cycle (kernel/liveupdate/luo_core.c).

:class:`Kernel` is one boot of the emulated kernel over a
:class:`~.kho.PhysicalMemory`:

* **early boot** (:meth:`Kernel.boot`): look for the KHO subtree ``"LUO"``;
  none means a first boot. A root smaller than 32 bytes, a compatible
  string other than ``"luo-v5"`` or a session chain that does not restore
  fails the boot, where the kernel panics: :class:`~liveupdate.errors.KernelPanic`.
  Otherwise the liveupdate number is taken from the root, the incoming
  session chain is adopted and the root page freed.
* **late boot**: a new root is allocated and preserved (liveupdate number
  + 1, sessions_pa 0 until the reboot, the FLB page), registered as "LUO".
* **the device**: one holder at a time (EBUSY); the first open deserializes
  the incoming sessions, and if that failed every open fails with EIO.
* **ioctls** (:meth:`Kernel.device_ioctl`, :meth:`Kernel.session_ioctl`):
  the rows of :data:`liveupdate._abi.COMMAND_TABLE` bound to handlers, as
  the kernel's IOCTL_OP tables are (:mod:`.ioctl_op`, which also runs the
  checks every command shares); the device's handlers are at the end of
  this module, the sessions' in :mod:`.luo_session`.
* **reboot** (:meth:`Kernel.reboot`): serialize every outgoing session, then
  hand the preserved memory over (:meth:`.kho.KHO.handover`).

File descriptors are the port's business: handlers get an :class:`FdTable`
to reserve an fd before the operation and install the result after it,
as the kernel does with get_unused_fd_flags() and fd_install().
"""
from __future__ import annotations

import errno
import logging
from typing import Any, Callable, Optional

from .. import _abi
from . import abi, luo_session
from .ioctl_op import DEVICE_OPS, FdTable
from .kho import KHO, PhysicalMemory
from . import file_handler
from .luo_file import LuoFiles
from .ucmd import Ucmd
from ..errors import KernelPanic

__all__ = ["Kernel", "FdTable"]

log = logging.getLogger("liveupdate.emulator.luo_core")


class Kernel:
    """One boot of the emulated kernel. Build it with :meth:`boot`."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.kho = KHO(memory)
        self.files = LuoFiles(self)
        self.sessions = luo_session.SessionGlobal(self)
        self.liveupdate_num = 0
        self.in_use = False
        self.alive = True
        # One instance of every registered handler per boot, as the kernel's
        # handlers register at init (memfd_luo is built in).
        for handler in file_handler.registered():
            self.files.register_handler(handler(self.kho, self.files.preserved))

    # -- boot ---------------------------------------------------------------------
    @classmethod
    def boot(cls, memory: PhysicalMemory) -> "Kernel":
        """Boot from ``memory`` (its handover). Raises KernelPanic when the
        incoming LUO state is unusable, as the kernel panics then."""
        kernel = cls(memory)
        try:
            kernel._early_startup()
        except OSError as exc:
            raise KernelPanic(
                f"liveupdate: the incoming tree failed to initialize properly [{_errname(exc.errno)}]: "
                f"{exc.strerror}") from None
        kernel._state_setup()
        return kernel

    def _early_startup(self) -> None:
        try:
            pa, size = self.kho.retrieve_subtree(abi.LUO_KHO_ENTRY_NAME)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return  # first boot: nothing handed over
            raise
        if size < abi.LUO_SER.size:
            raise OSError(errno.EINVAL, f"LUO state is too small ({size} < {abi.LUO_SER.size})")
        compatible, num, sessions_pa, _flbs_pa = abi.LUO_SER.unpack(self.memory.read(pa, abi.LUO_SER.size))
        if not abi.compatible_is(compatible, abi.LUO_ABI_COMPATIBLE):
            raise OSError(errno.EINVAL, f"LUO state {_shown(compatible)} is incompatible with "
                                        f"{_shown(abi.LUO_ABI_COMPATIBLE)}")
        self.liveupdate_num = num
        log.info("retrieved live update data, liveupdate number %d", num)
        try:
            self.sessions.setup_incoming(sessions_pa)
            # FLBs: memfd registers none, so the incoming FLB page is left alone.
        finally:
            self.kho.restore_free(pa)

    def _state_setup(self) -> None:
        kho = self.kho
        root = kho.alloc_preserve(abi.LUO_SER.size)
        flbs = kho.alloc_preserve(abi.LUO_FLB_PGCNT * abi.PAGE_SIZE)
        self.memory.write(flbs, abi.FLB_HEADER.pack(abi.LUO_FLB_PGCNT, 0))
        self.memory.write(root, abi.LUO_SER.pack(abi.LUO_ABI_COMPATIBLE, (self.liveupdate_num + 1) & (2**64 - 1), 0,
                                                 flbs))
        self.sessions.setup_outgoing(root + 16)
        kho.add_subtree(abi.LUO_KHO_ENTRY_NAME, root, abi.LUO_SER.size)

    # -- the device -------------------------------------------------------------------
    def open(self) -> None:
        """luo_open(). Raises OSError EBUSY (held) or EIO (the incoming
        sessions could not be restored; every open fails then)."""
        if self.in_use:
            raise OSError(errno.EBUSY, "another holder has the device open")
        self.in_use = True
        if self.sessions.deserialize():
            self.in_use = False
            raise OSError(errno.EIO, "the sessions of the previous kernel could not be restored")

    def release(self) -> None:
        self.in_use = False

    def device_ioctl(self, cmd: int, arg: bytes, fds: FdTable) -> bytes:
        """luo_ioctl() on the device fd. Raises OSError (see module doc)."""
        row, execute, user_size = DEVICE_OPS.find(cmd, arg)
        ucmd = DEVICE_OPS.ucmd(row, arg, user_size)
        execute(self, ucmd, fds)
        return ucmd.respond(row.size)

    def session_ioctl(self, session: "luo_session.LuoSession", cmd: int, arg: bytes, fds: FdTable) -> bytes:
        """luo_session_ioctl() on a session fd. Raises OSError."""
        return self.sessions.ioctl(session, cmd, arg, fds)

    def release_session(self, session: "luo_session.LuoSession") -> None:
        self.sessions.release(session)

    # -- reboot -------------------------------------------------------------------------
    def reboot(self, write_image: "Optional[Callable[[Any], None]]" = None) -> None:
        """liveupdate_reboot() and the KHO finalization that follows: after
        it the memory holds only what the next kernel gets, and this kernel
        is gone. Raises OSError if serialization fails (nothing changes).

        ``write_image(handover)`` runs after the serialization and before
        anything is handed over: if it raises, the serialization is undone
        and this kernel runs on, as a kernel whose serialization fails
        fails the reboot (the image is the emulator's stand-in for memory
        that survives the reboot: no image, no handover)."""
        self.sessions.serialize()
        pending = self.kho.pending_handover()
        if write_image is not None:
            try:
                write_image(pending)
            except BaseException:
                self.sessions.unserialize()
                raise
        self.kho.handover(pending)
        self.alive = False
        self._power_off()

    def _power_off(self) -> None:
        # The machine is gone: every file reference of this kernel goes with
        # it (the memory keeps its own references to memfd pages it hands
        # over, see kho.Backing).
        for header in (self.sessions.outgoing, self.sessions.incoming):
            for session in header.sessions.values():
                for luo_file in session.file_set.files:
                    if luo_file.file is not None:
                        luo_file.file.put()
                        luo_file.file = None
        self.files.preserved.clear()

    # -- REPL ----------------------------------------------------------------------------------
    def __repr__(self) -> str:
        s = self.sessions
        state = "running" if self.alive else "replaced"
        return (f"<emulated kernel #{self.liveupdate_num} {state}: {s.outgoing.count} outgoing, "
                f"{s.incoming.count} incoming sessions, {len(self.files.preserved)} files held, "
                f"device {'open' if self.in_use else 'free'}>")


def _shown(compatible: bytes) -> str:
    # A compatible string as it is, quoted, whatever bytes it holds.
    return "'" + abi.cstr(compatible).decode("utf-8", "backslashreplace") + "'"


def _errname(err: Optional[int]) -> str:
    return "-" + errno.errorcode.get(err or 0, str(err))


# -- the device ioctls (luo_core.c), bound to the command table's rows -------------

def _new_session(kernel: Kernel, ucmd: Ucmd, fds: FdTable, retrieve: bool) -> None:
    # Both commands reserve the fd first (EMFILE before anything happens),
    # then find or make the session, then install it in the struct's fd.
    size, _fd, name = _abi.CREATE_SESSION.unpack(ucmd.cmd)
    fd = fds.reserve_session_fd()
    try:
        session = kernel.sessions.retrieve(name) if retrieve else kernel.sessions.create(name)
    except BaseException:
        fds.put_unused_fd(fd)
        raise
    ucmd.cmd[:] = _abi.CREATE_SESSION.pack(size, fd, name)
    fds.install_session(fd, session)


@DEVICE_OPS.handles("LIVEUPDATE_IOCTL_CREATE_SESSION")
def _create_session(kernel: Kernel, ucmd: Ucmd, fds: FdTable) -> None:
    _new_session(kernel, ucmd, fds, retrieve=False)


@DEVICE_OPS.handles("LIVEUPDATE_IOCTL_RETRIEVE_SESSION")
def _retrieve_session(kernel: Kernel, ucmd: Ucmd, fds: FdTable) -> None:
    _new_session(kernel, ucmd, fds, retrieve=True)
