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
* **ioctls** (:meth:`Kernel.device_ioctl`, :meth:`Kernel.session_ioctl`),
  with the kernel's argument rules, in its order: a command number out of
  the table is EINVAL; a missing size field EFAULT; a number in range but
  not exactly the table's (other type, direction or size bits) ENOTTY
  (the kernel's ENOIOCTLCMD as the VFS reports it); on a session, the
  wrong kind of session EINVAL; a size below the struct's last field
  EINVAL; non-zero bytes beyond the struct E2BIG.
* **reboot** (:meth:`Kernel.reboot`): serialize every outgoing session, then
  hand the preserved memory over (:meth:`.kho.KHO.handover`).

File descriptors are the port's business: handlers get an :class:`FdTable`
to reserve an fd before the operation and install the result after it,
as the kernel does with get_unused_fd_flags() and fd_install().
"""
from __future__ import annotations

import errno
import logging
import sys
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from . import abi, luo_session
from .kho import KHO, PhysicalMemory
from .memfd_luo import MemfdHandler
from .luo_file import LuoFiles
from .ucmd import Ucmd, copy_struct_from_user, get_user_size
from ..errors import KernelPanic

__all__ = ["Kernel", "FdTable", "IOC_NR"]

log = logging.getLogger("liveupdate.emulator.luo_core")

# ioctl argument structs are in the caller's byte order (the serialized
# state, unlike them, is little-endian).
_NATIVE = sys.byteorder
IOCTL_TYPE = 0xBA
CMD_BASE = 0x00
CMD_SESSION_BASE = 0x40


def _io(nr: int) -> int:
    return (IOCTL_TYPE << 8) | nr


def IOC_NR(cmd: int) -> int:
    return cmd & 0xFF


CREATE_SESSION = _io(0x00)
RETRIEVE_SESSION = _io(0x01)
SESSION_PRESERVE_FD = _io(0x40)
SESSION_RETRIEVE_FD = _io(0x41)
SESSION_FINISH = _io(0x42)
SESSION_GET_NAME = _io(0x43)


class FdTable(Protocol):
    """The caller's fd table, as the port lends it to one ioctl: reserve a
    number first (get_unused_fd_flags(): EMFILE before anything else
    happens), then install the result in it (fd_install()) or give it back
    (put_unused_fd()) when the operation failed."""

    def reserve_session_fd(self) -> int: ...

    def install_session(self, fd: int, session: "luo_session.LuoSession") -> None: ...

    def reserve_file_fd(self) -> int: ...

    def install_file(self, fd: int, file: Any) -> None: ...

    def put_unused_fd(self, fd: int) -> None: ...


# (struct size, offsetofend of the last required field, the exact command)
_NAME_STRUCT = 8 + abi.NAME_LENGTH
_DEVICE_OPS: Dict[int, Tuple[int, int, int]] = {
    0: (_NAME_STRUCT, _NAME_STRUCT, CREATE_SESSION),
    1: (_NAME_STRUCT, _NAME_STRUCT, RETRIEVE_SESSION),
}
# (size, min size, command, accepted on: "incoming", "outgoing" or "all")
_SESSION_OPS: Dict[int, Tuple[int, int, int, str]] = {
    0: (16, 16, SESSION_PRESERVE_FD, "outgoing"),
    1: (16, 16, SESSION_RETRIEVE_FD, "incoming"),
    2: (8, 8, SESSION_FINISH, "incoming"),
    3: (_NAME_STRUCT, _NAME_STRUCT, SESSION_GET_NAME, "all"),
}


class Kernel:
    """One boot of the emulated kernel. Build it with :meth:`boot`."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.kho = KHO(memory)
        self.files = LuoFiles(self)
        self.sessions = luo_session.SessionGlobal(self)
        self.liveupdate_num = 0
        self.luo_ser_out = 0
        self.in_use = False
        self.alive = True
        self.files.register_handler(MemfdHandler(self.kho, self.files.preserved))

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
        if compatible[: abi.LUO_ABI_COMPAT_LEN] != abi.LUO_ABI_COMPATIBLE.ljust(abi.LUO_ABI_COMPAT_LEN, b"\0"):
            raise OSError(errno.EINVAL, f"LUO state {abi.cstr(compatible)!r} is incompatible with 'luo-v5'")
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
        self.luo_ser_out = root

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
        nr = IOC_NR(cmd) - CMD_BASE
        op = _DEVICE_OPS.get(nr)
        if op is None:
            raise OSError(errno.EINVAL, f"device command number {IOC_NR(cmd):#x} does not exist")
        user_size = get_user_size(arg)
        size, min_size, number = op
        if cmd != number:
            raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} is not {number:#x}")
        if user_size < min_size:
            raise OSError(errno.EINVAL, f"argument size {user_size} is below {min_size}")
        ucmd = Ucmd(arg, user_size, copy_struct_from_user(size, arg, user_size))
        find: Callable[[bytes], "luo_session.LuoSession"]
        find = self.sessions.create if nr == 0 else self.sessions.retrieve
        fd = fds.reserve_session_fd()
        try:
            session = find(bytes(ucmd.cmd[8:]))
        except BaseException:
            fds.put_unused_fd(fd)
            raise
        ucmd.cmd[4:8] = fd.to_bytes(4, _NATIVE, signed=True)
        fds.install_session(fd, session)
        return ucmd.respond(size)

    def session_ioctl(self, session: "luo_session.LuoSession", cmd: int, arg: bytes, fds: FdTable) -> bytes:
        """luo_session_ioctl() on a session fd. Raises OSError."""
        nr = IOC_NR(cmd)
        op = _SESSION_OPS.get(nr - CMD_SESSION_BASE) if nr >= CMD_SESSION_BASE else None
        if op is None:
            raise OSError(errno.EINVAL, f"session command number {nr:#x} does not exist")
        user_size = get_user_size(arg)
        size, min_size, number, applies = op
        if cmd != number:
            raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} is not {number:#x}")
        if applies != "all" and (applies == "incoming") != session.retrieved:
            raise OSError(errno.EINVAL, f"this command works on {applies} sessions; this one is {session.state}")
        if user_size < min_size:
            raise OSError(errno.EINVAL, f"argument size {user_size} is below {min_size}")
        ucmd = Ucmd(arg, user_size, copy_struct_from_user(size, arg, user_size))
        buf = ucmd.cmd
        if number == SESSION_PRESERVE_FD:
            fd = int.from_bytes(buf[4:8], _NATIVE, signed=True)
            self.sessions.preserve_fd(session, int.from_bytes(buf[8:16], _NATIVE), fd)
        elif number == SESSION_RETRIEVE_FD:
            newfd = fds.reserve_file_fd()
            try:
                file = self.sessions.retrieve_fd(session, int.from_bytes(buf[8:16], _NATIVE))
            except BaseException:
                fds.put_unused_fd(newfd)
                raise
            buf[4:8] = newfd.to_bytes(4, _NATIVE, signed=True)
            fds.install_file(newfd, file)
        elif number == SESSION_FINISH:
            if int.from_bytes(buf[4:8], _NATIVE):
                raise OSError(errno.EINVAL, "the reserved field must be zero")
            self.sessions.finish(session)
        else:
            if int.from_bytes(buf[4:8], _NATIVE):
                raise OSError(errno.EINVAL, "the reserved field must be zero")
            _strscpy_into(buf, 8, session.name, abi.NAME_LENGTH)
        return ucmd.respond(size)

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


def _strscpy_into(buf: bytearray, offset: int, name: bytes, size: int) -> None:
    """strscpy() into the caller's struct as the kernel's word-at-a-time
    copy leaves it (x86-64, arm64): the name, its NUL, zeros to the end of
    the 8-byte word that holds the NUL, and the caller's bytes after that."""
    name = name[: size - 1]
    end = min(size, (len(name) // 8 + 1) * 8)
    buf[offset : offset + end] = name.ljust(end, b"\0")


def _errname(err: Optional[int]) -> str:
    return "-" + errno.errorcode.get(err or 0, str(err))
