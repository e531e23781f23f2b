"""Sessions (kernel/liveupdate/luo_session.c).

Two lists: *outgoing* sessions, created in this kernel and handed to the
next one at reboot, and *incoming* sessions, restored from the previous
kernel and retrievable (once each) by name. A session created here is
outgoing; a retrieved one is incoming (``retrieved`` is set). Which ioctls a
session fd accepts depends on that: preserve on outgoing only,
retrieve-fd and finish on incoming only, get-name on both (EINVAL
otherwise).

Create: the name is 1 to 63 bytes (EINVAL), the outgoing chain grows to make
room (ENOSPC at the block cap), then a duplicate name is EEXIST. Like the
kernel, a duplicate does not shrink the chain back: a duplicate refused
while the sessions exactly fill their blocks leaves an empty block at the
end of the chain, which a kexec at that moment hands over, and the next
kernel refuses at boot (a block with count 0) -- a failed boot. Emulated
faithfully; the kernel wins.

Release (the last close of a session fd): an outgoing session unpreserves
its files; an incoming one is finished; either way it leaves its list.

Reboot: :meth:`SessionGlobal.serialize` writes one ``luo_session_ser`` per
outgoing session (name, files chain, file count) into the session chain and
its head into the LUO root. Boot: :meth:`SessionGlobal.setup_incoming`
adopts the chain (a failure there fails the boot); the first open of the
device runs :meth:`SessionGlobal.deserialize` once and remembers its result
for every later open.

Names are found through dicts (insertion ordered, so serialization keeps
creation order) rather than the kernel's list walk.

The session ioctls are here, as in the kernel: :meth:`SessionGlobal.ioctl`
dispatches through :data:`.ioctl_op.SESSION_OPS`, whose rows come from the
command table and whose handlers are the ``@SESSION_OPS.handles`` functions
at the end of this module.
"""
from __future__ import annotations

import errno
import logging
from typing import Dict

from .. import _abi
from . import abi, luo_file
from .ioctl_op import SESSION_OPS, FdTable
from .kho_block import BlockSet
from .luo_file import KernelParts as Kernel
from .ucmd import Ucmd

__all__ = ["LuoSession", "SessionHeader", "SessionGlobal"]

log = logging.getLogger("liveupdate.emulator.luo_session")


class LuoSession(luo_file.FileSet):
    """One session: its name (bytes, at most 63), whether it came from the
    previous kernel and was retrieved, and its files (the session *is* its
    :class:`~.luo_file.FileSet`; ``file_set`` names it as the kernel does)."""

    __slots__ = ("name", "retrieved", "released")

    def __init__(self, kernel: "Kernel", name: bytes) -> None:
        luo_file.FileSet.__init__(self, kernel)
        self.name = name
        self.retrieved = False
        self.released = False

    @property
    def file_set(self) -> "luo_file.FileSet":
        return self

    @property
    def state(self) -> str:
        return "incoming" if self.retrieved else "outgoing"

    def __repr__(self) -> str:
        return (f"<LuoSession {self.name.decode('utf-8', 'backslashreplace')!r} {self.state} "
                f"{self.count} files in {self.nblocks} blocks>")


class SessionHeader:
    """One list of sessions (luo_session_header) and, for the outgoing one,
    the block chain it serializes into."""

    __slots__ = ("sessions", "block_set", "active", "outgoing")

    def __init__(self, kernel: "Kernel", outgoing: bool) -> None:
        self.sessions: Dict[bytes, LuoSession] = {}
        self.block_set = BlockSet(kernel.kho, abi.SESSION_SER.size)
        self.active = False
        self.outgoing = outgoing

    @property
    def count(self) -> int:
        return len(self.sessions)

    def insert(self, session: LuoSession) -> None:
        """luo_session_insert(). Raises OSError ENOSPC (outgoing chain full)
        or EEXIST (name taken; the grown chain is not shrunk back)."""
        if self.outgoing:
            self.block_set.grow(self.count + 1)
        if session.name in self.sessions:
            raise OSError(errno.EEXIST, f"a session named {session.name!r} exists")
        self.sessions[session.name] = session

    def remove(self, session: LuoSession) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
        if self.outgoing:
            self.block_set.shrink(self.count)

    def __repr__(self) -> str:
        kind = "outgoing" if self.outgoing else "incoming"
        return f"<{kind} sessions: {self.count}, {self.block_set!r}>"


class SessionGlobal:
    """Both lists and the once-only deserialization state."""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.incoming = SessionHeader(kernel, outgoing=False)
        self.outgoing = SessionHeader(kernel, outgoing=True)
        self.sessions_pa_at = 0  # where the LUO root keeps sessions_pa
        self.deserialized = False
        self.saved_err = 0

    # -- user-facing operations ---------------------------------------------------
    def create(self, name_field: bytes) -> LuoSession:
        """luo_session_create(). Raises OSError EINVAL, ENOSPC, EEXIST."""
        nul = name_field.find(b"\0")
        length = len(name_field) if nul < 0 else nul
        if length == 0 or length > abi.NAME_LENGTH - 1:
            raise OSError(errno.EINVAL, "a session name is 1 to 63 bytes")
        session = LuoSession(self.kernel, name_field[:length])
        self.outgoing.insert(session)
        return session

    def retrieve(self, name_field: bytes) -> LuoSession:
        """luo_session_retrieve(). Raises OSError ENOENT (no such incoming
        session) or EINVAL (retrieved already)."""
        nul = name_field.find(b"\0")
        # strncmp over 64 bytes against a stored name that always ends
        # within 64: a field without a NUL matches nothing.
        session = self.incoming.sessions.get(name_field[:nul]) if nul >= 0 else None
        if session is None:
            raise OSError(errno.ENOENT, "no incoming session of that name")
        if session.retrieved:
            raise OSError(errno.EINVAL, "the session was retrieved already")
        session.retrieved = True
        return session

    def release(self, session: LuoSession) -> None:
        """luo_session_release(): the last fd of ``session`` closed."""
        if session.released:
            return
        files = self.kernel.files
        if session.retrieved:
            luo_file.finish(files, session.file_set)
            header = self.incoming
        else:
            luo_file.unpreserve_files(files, session.file_set)
            header = self.outgoing
        header.remove(session)
        session.released = True

    def preserve_fd(self, session: LuoSession, token: int, fd: int) -> None:
        luo_file.preserve_file(self.kernel.files, session.file_set, token, fd)

    def retrieve_fd(self, session: LuoSession, token: int) -> "luo_file.KernelFile":
        return luo_file.retrieve_file(self.kernel.files, session.file_set, token)

    def finish(self, session: LuoSession) -> None:
        luo_file.finish(self.kernel.files, session.file_set)

    def ioctl(self, session: LuoSession, cmd: int, arg: bytes, fds: FdTable) -> bytes:
        """luo_session_ioctl(): the shared checks (see :mod:`.ioctl_op`),
        the session's kind against the row's, then the row's handler.
        Raises OSError."""
        row, execute, user_size = SESSION_OPS.find(cmd, arg)
        if session.state not in row.states:
            raise OSError(errno.EINVAL, f"{row.name} works on {' and '.join(row.states)} sessions; "
                                        f"this one is {session.state}")
        ucmd = SESSION_OPS.ucmd(row, arg, user_size)
        execute(self, session, ucmd, fds)
        return ucmd.respond(row.size)

    # -- boot and reboot -------------------------------------------------------------
    def setup_outgoing(self, sessions_pa_at: int) -> None:
        self.sessions_pa_at = sessions_pa_at
        self.outgoing.active = True

    def setup_incoming(self, sessions_pa: int) -> None:
        """Adopt the previous kernel's session chain (at boot). Raises the
        chain's OSError (the caller fails the boot)."""
        if not sessions_pa:
            return
        self.incoming.block_set.restore(sessions_pa)
        self.incoming.active = True

    def deserialize(self) -> int:
        """Build the incoming sessions once; 0 or the errno, the same on
        every call (the device answers EIO to every open after a failure)."""
        if self.deserialized:
            return self.saved_err
        self.deserialized = True
        if not self.incoming.active:
            return 0
        header = self.incoming
        memory = self.kernel.kho.memory
        try:
            for entry in header.block_set.entries():
                name, files_pa, count = abi.SESSION_SER.unpack(memory.read(entry, abi.SESSION_SER.size))
                session = LuoSession(self.kernel, abi.cstr(name)[: abi.NAME_LENGTH - 1])
                header.insert(session)
                luo_file.deserialize(self.kernel.files, session.file_set, files_pa, count)
        except OSError as exc:
            log.warning("session deserialization failed: %s", exc)
            header.block_set.destroy()
            self.saved_err = exc.errno or errno.EIO
            return self.saved_err
        header.block_set.destroy()
        return 0

    def serialize(self) -> None:
        """Write every outgoing session into the chain (at reboot). On
        failure the sessions frozen so far are rolled back and the OSError
        raised (the kexec does not happen)."""
        header = self.outgoing
        memory = self.kernel.kho.memory
        memory.write_u64(self.sessions_pa_at, 0)
        it = header.block_set.iterator()
        sessions = list(header.sessions.values())
        for i, session in enumerate(sessions):
            entry = it.reserve_entry()
            try:
                if entry is None:
                    raise OSError(errno.ENOSPC, "session blocks were not preallocated")
                try:
                    luo_file.freeze(self.kernel.files, session.file_set, entry + abi.NAME_LENGTH)
                except OSError:
                    it.prev()
                    raise
            except OSError:
                for done in reversed(sessions[:i]):
                    slot = it.prev()
                    assert slot is not None
                    luo_file.unfreeze(done.file_set, slot + abi.NAME_LENGTH)
                    memory.write(slot, bytes(abi.NAME_LENGTH))
                raise
            memory.write(entry, abi.strscpy(session.name, abi.NAME_LENGTH))
        if header.count > 0:
            memory.write_u64(self.sessions_pa_at, header.block_set.head_pa)

    def unserialize(self) -> None:
        """Undo a :meth:`serialize` that succeeded, when what follows it
        fails (the emulator's image write): every session unfrozen and its
        entry cleared, as the kernel's error path does, and no session chain
        in the root. The old kernel then runs on as if no reboot was tried."""
        header = self.outgoing
        memory = self.kernel.kho.memory
        it = header.block_set.iterator()
        slots = [it.reserve_entry() for _ in header.sessions]
        for session, slot in reversed(list(zip(header.sessions.values(), slots, strict=True))):
            if slot is None:
                continue
            luo_file.unfreeze(session.file_set, slot + abi.NAME_LENGTH)
            memory.write(slot, bytes(abi.NAME_LENGTH))
        memory.write_u64(self.sessions_pa_at, 0)

# -- the session ioctls (luo_session.c), bound to the command table's rows ------

#: Where GET_NAME's name field starts, from the row's layout.
_NAME_AT = {f: o for f, o, _ in _abi.BY_NUMBER[_abi.SESSION_GET_NAME].fields}["name"]


@SESSION_OPS.handles("LIVEUPDATE_SESSION_PRESERVE_FD")
def _preserve_fd(sessions: SessionGlobal, session: LuoSession, ucmd: Ucmd, fds: FdTable) -> None:
    _size, fd, token = _abi.PRESERVE_FD.unpack(ucmd.cmd)
    sessions.preserve_fd(session, token, fd)


@SESSION_OPS.handles("LIVEUPDATE_SESSION_RETRIEVE_FD")
def _retrieve_fd(sessions: SessionGlobal, session: LuoSession, ucmd: Ucmd, fds: FdTable) -> None:
    _size, _fd, token = _abi.RETRIEVE_FD.unpack(ucmd.cmd)
    newfd = fds.reserve_file_fd()
    try:
        file = sessions.retrieve_fd(session, token)
    except BaseException:
        fds.put_unused_fd(newfd)
        raise
    ucmd.cmd[:] = _abi.RETRIEVE_FD.pack(_size, newfd, token)
    fds.install_file(newfd, file)


@SESSION_OPS.handles("LIVEUPDATE_SESSION_FINISH")
def _finish(sessions: SessionGlobal, session: LuoSession, ucmd: Ucmd, fds: FdTable) -> None:
    if _abi.FINISH.unpack(ucmd.cmd)[1]:
        raise OSError(errno.EINVAL, "the reserved field must be zero")
    sessions.finish(session)


@SESSION_OPS.handles("LIVEUPDATE_SESSION_GET_NAME")
def _get_name(sessions: SessionGlobal, session: LuoSession, ucmd: Ucmd, fds: FdTable) -> None:
    if _abi.GET_NAME.unpack(ucmd.cmd)[1]:
        raise OSError(errno.EINVAL, "the reserved field must be zero")
    _strscpy_into(ucmd.cmd, _NAME_AT, session.name, abi.NAME_LENGTH)


def _strscpy_into(buf: bytearray, offset: int, name: bytes, size: int) -> None:
    """strscpy() into the caller's struct as the kernel's word-at-a-time
    copy leaves it (x86-64, arm64): the name, its NUL, zeros to the end of
    the 8-byte word that holds the NUL, and the caller's bytes after that."""
    name = name[: size - 1]
    end = min(size, (len(name) // 8 + 1) * 8)
    buf[offset : offset + end] = name.ljust(end, b"\0")
