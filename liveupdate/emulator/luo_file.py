"""Preserved files of a session (kernel/liveupdate/luo_file.c).

A session's :class:`FileSet` holds its files in preservation order, each a
:class:`LuoFile` (handler, kernel file reference, the handler's serialized
handle, token, retrieve status). Before a kexec, :func:`preserve_file` adds
one; closing the session unpreserves them all (last first). At reboot
:func:`freeze` writes one ``luo_file_ser`` per file into the set's block
chain. After the kexec :func:`deserialize` rebuilds the set, checking the
count the previous kernel recorded (EINVAL on a mismatch);
:func:`retrieve_file` makes a file again (once; later calls give the same
file, a failure is remembered and returned again); :func:`finish` lets go of
everything, files never retrieved included.

Checks of ``preserve`` in the kernel's order: token already in the set
(EEXIST), room in the chain (ENOSPC), the fd (EBADF), a handler that accepts
the file (ENOENT), the file already preserved by any session (EBUSY; a file
is identified as the handler says: a memfd by its inode, so every fd and
every open of it counts as the same file), then the handler's own checks.

Unlike the kernel, whose token check walks the whole list, tokens are found
through a dict: per-operation cost does not grow with the number of files.
"""
from __future__ import annotations

import errno
import logging
from typing import Any, Dict, List, Optional, Protocol, Tuple

from . import abi
from .file_handler import FileHandler
from .kfile import KernelFile
from .kho import KHO
from .kho_block import BlockSet

__all__ = ["KernelParts", "FileOpArgs", "LuoFile", "FileSet", "LuoFiles", "preserve_file", "unpreserve_files", "freeze",
           "unfreeze", "retrieve_file", "finish", "deserialize"]

log = logging.getLogger("liveupdate.emulator.luo_file")


class KernelParts(Protocol):
    """What the file and session code uses of a kernel (luo_core.Kernel):
    named here, not imported, so that luo_core, which builds on this
    module, is not imported back by it."""

    kho: KHO
    files: "LuoFiles"


class FileOpArgs:
    """What LUO passes a file handler (liveupdate_file_op_args)."""

    __slots__ = ("handler", "file", "serialized_data", "private_data", "retrieve_status", "token", "fd")

    def __init__(self, handler: Any, file: Optional[KernelFile] = None, serialized_data: int = 0,
                 private_data: Any = None, retrieve_status: int = 0, token: int = 0) -> None:
        self.fd = -1  # the caller's fd, during preserve only
        self.handler = handler
        self.file = file
        self.serialized_data = serialized_data
        self.private_data = private_data
        self.retrieve_status = retrieve_status
        self.token = token


class LuoFile:
    """One preserved file. ``retrieve_status``: 0 never tried, 1 retrieved,
    negative: the -errno the failed retrieve returned (kept forever)."""

    __slots__ = ("fh", "file", "serialized_data", "private_data", "retrieve_status", "token")

    def __init__(self, fh: FileHandler, file: Optional[KernelFile], token: int) -> None:
        self.fh = fh
        self.file = file
        self.serialized_data = 0
        self.private_data: Any = None
        self.retrieve_status = 0
        self.token = token

    def args(self) -> FileOpArgs:
        return FileOpArgs(self.fh, self.file, self.serialized_data, self.private_data, self.retrieve_status,
                          self.token)

    def __repr__(self) -> str:
        status = {0: "", 1: " retrieved"}.get(self.retrieve_status, f" failed({-self.retrieve_status})")
        return (f"<LuoFile token={self.token} {self.fh.compatible.decode()} data={self.serialized_data:#x}"
                f"{status}>")


#: The token index of every set that never had a file (never written to).
_NO_FILES: Dict[int, "LuoFile"] = {}


class FileSet:
    """The files of one session (luo_file_set): ``files`` in preservation
    order, ``by_token`` to find them, and the block chain they serialize to."""

    # A session embeds its file set (as struct luo_session embeds struct
    # luo_file_set), so LuoSession derives from this class: one object per
    # session, which matters for a kernel with 100,000 of them.
    __slots__ = ("files", "by_token", "_block_set", "_kho", "count", "duplicates")

    def __init__(self, kernel: "KernelParts") -> None:
        # A shared empty tuple until the first file (see BlockSet.blocks).
        self.files: "List[LuoFile] | Tuple[LuoFile, ...]" = ()
        # First file with each token: a corrupted incoming set may repeat a
        # token, and the kernel's list walk finds the first one.
        self.by_token: Dict[int, LuoFile] = _NO_FILES
        self._block_set: Optional[BlockSet] = None
        self._kho = kernel.kho
        self.count = 0
        self.duplicates = False

    @property
    def block_set(self) -> BlockSet:
        """The set's block chain (made on first use)."""
        bs = self._block_set
        if bs is None:
            bs = self._block_set = BlockSet(self._kho, abi.FILE_SER.size)
        return bs

    @property
    def nblocks(self) -> int:
        return 0 if self._block_set is None else self._block_set.nblocks

    def _append(self, luo_file: LuoFile) -> None:
        if isinstance(self.files, tuple):
            self.files = [luo_file]
            self.by_token = {}
        else:
            self.files.append(luo_file)
        if self.by_token.setdefault(luo_file.token, luo_file) is not luo_file:
            self.duplicates = True

    def _pop(self) -> LuoFile:
        luo_file = self.files.pop()  # type: ignore[union-attr]
        if self.by_token.get(luo_file.token) is luo_file:
            del self.by_token[luo_file.token]
            # A duplicate token earlier in the list becomes the one found.
            # Only corrupted incoming sets have duplicates, so the scan is rare.
            for other in self.files if self.duplicates else ():
                if other.token == luo_file.token:
                    self.by_token[other.token] = other
                    break
        return luo_file

    def __repr__(self) -> str:
        return f"<FileSet {self.count} files, {self.nblocks} blocks>"


class LuoFiles:
    """The kernel-wide file state: registered handlers and the index of
    files preserved (or retrieved and not finished) by any session."""

    def __init__(self, kernel: "KernelParts") -> None:
        self.kernel = kernel
        self.handlers: List[FileHandler] = []
        self.preserved: Dict[Any, "tuple[KernelFile, FileSet]"] = {}

    def register_handler(self, fh: FileHandler) -> None:
        """liveupdate_register_file_handler() of one kernel. EINVAL for what
        is not a FileHandler (the contract: .file_handler), EEXIST for a
        compatible string already registered."""
        if not isinstance(fh, FileHandler):
            raise OSError(errno.EINVAL, f"{fh!r} is not a FileHandler")
        if any(other.compatible == fh.compatible for other in self.handlers):
            raise OSError(errno.EEXIST, f"file handler {fh.compatible!r} already registered")
        self.handlers.append(fh)

    def handler_for(self, compatible_field: bytes) -> Optional[FileHandler]:
        # strcmp against the 48-byte field: equal only if the field holds
        # the handler's string followed by a NUL.
        for fh in self.handlers:
            if compatible_field[: len(fh.compatible) + 1] == fh.compatible + b"\0":
                return fh
        return None


def preserve_file(files: LuoFiles, file_set: FileSet, token: int, fd: int) -> None:
    """luo_preserve_file(). Raises OSError EEXIST, ENOSPC, EBADF, ENOENT,
    EBUSY, or the handler's errno (memfd: EOPNOTSUPP, EFBIG)."""
    if token in file_set.by_token:
        raise OSError(errno.EEXIST, f"token {token} is already used in this session")
    file_set.block_set.grow(file_set.count + 1)
    try:
        file = KernelFile.fget(fd)
    except OSError:
        file_set.block_set.shrink(file_set.count)
        raise
    try:
        fh = next((fh for fh in files.handlers if fh.can_preserve(file)), None)
        if fh is None:
            raise OSError(errno.ENOENT, f"no live update handler can preserve fd {fd} (only memfds can be)")
        ident = fh.get_id(file)
        if ident in files.preserved:
            raise OSError(errno.EBUSY, f"the file of fd {fd} is already preserved in a session")
        files.preserved[ident] = (file, file_set)
        luo_file = LuoFile(fh, file, token)
        args = FileOpArgs(fh, file, token=token)
        args.fd = fd
        try:
            fh.preserve(args)
        except BaseException:
            del files.preserved[ident]
            raise
    except BaseException:
        file.put()
        file_set.block_set.shrink(file_set.count)
        raise
    luo_file.serialized_data = args.serialized_data
    luo_file.private_data = args.private_data
    file_set._append(luo_file)
    file_set.count += 1


def unpreserve_files(files: LuoFiles, file_set: FileSet) -> None:
    """luo_file_unpreserve_files(): undo every preserve, last first."""
    while file_set.files:
        luo_file = file_set._pop()
        luo_file.fh.unpreserve(luo_file.args())
        assert luo_file.file is not None
        files.preserved.pop(luo_file.fh.get_id(luo_file.file), None)
        file_set.count -= 1
        file_set.block_set.shrink(file_set.count)
        luo_file.file.put()
    file_set.block_set.destroy()


def freeze(files: LuoFiles, file_set: FileSet, file_set_ser_pa: int) -> None:
    """luo_file_freeze(): let each handler freeze its file and write one
    luo_file_ser per file, then ``{files, count}`` at ``file_set_ser_pa``.
    On failure the files frozen so far are unfrozen and the chain cleared."""
    if not file_set.count:
        return
    memory = file_set.block_set.kho.memory
    it = file_set.block_set.iterator()
    for luo_file in file_set.files:
        entry = it.reserve_entry()
        try:
            if entry is None:
                raise OSError(errno.ENOSPC, "file blocks were not preallocated")
            args = luo_file.args()
            luo_file.fh.freeze(args)
            luo_file.serialized_data = args.serialized_data
        except OSError as exc:
            log.warning("freeze failed for token %#x: %s", luo_file.token, exc)
            _unfreeze_until(file_set, luo_file)
            raise
        memory.write(entry, abi.FILE_SER.pack(abi.strscpy(luo_file.fh.compatible, abi.HNDL_COMPAT_LENGTH),
                                              luo_file.serialized_data, luo_file.token))
    memory.write(file_set_ser_pa, abi.U64.pack(file_set.block_set.head_pa) + abi.U64.pack(file_set.count))


def _unfreeze_until(file_set: FileSet, failed: Optional[LuoFile]) -> None:
    for luo_file in file_set.files:
        if luo_file is failed:
            break
        luo_file.fh.unfreeze(luo_file.args())
    file_set.block_set.clear()


def unfreeze(file_set: FileSet, file_set_ser_pa: int) -> None:
    """luo_file_unfreeze(): roll back a whole set after a later failure."""
    if not file_set.count:
        return
    _unfreeze_until(file_set, None)
    file_set.block_set.kho.memory.write(file_set_ser_pa, bytes(16))


def retrieve_file(files: LuoFiles, file_set: FileSet, token: int) -> KernelFile:
    """luo_retrieve_file(): the file preserved under ``token``.

    Raises OSError: ENOENT for an unknown token; the handler's errno on a
    failed retrieve, and the same errno on every later attempt."""
    luo_file = file_set.by_token.get(token) if file_set.files else None
    if luo_file is None:
        raise OSError(errno.ENOENT, f"no file with token {token} in this session")
    if luo_file.retrieve_status < 0:
        raise OSError(-luo_file.retrieve_status, f"retrieving token {token} failed before")
    if luo_file.retrieve_status > 0:
        assert luo_file.file is not None
        return luo_file.file
    args = luo_file.args()
    try:
        luo_file.fh.retrieve(args)
    except OSError as exc:
        luo_file.retrieve_status = -(exc.errno or errno.EIO)
        raise
    luo_file.file = args.file
    assert luo_file.file is not None
    ident = luo_file.fh.get_id(luo_file.file)
    if ident in files.preserved:
        log.warning("retrieved file of token %#x is already in the preserved index", token)
    else:
        files.preserved[ident] = (luo_file.file, file_set)
    luo_file.retrieve_status = 1
    return luo_file.file


def finish(files: LuoFiles, file_set: FileSet) -> None:
    """luo_file_finish(): release every file of an incoming set (retrieved
    or not) and its blocks. Handlers may veto with can_finish (EBUSY)."""
    if not file_set.count:
        return
    for luo_file in file_set.files:
        if not luo_file.fh.can_finish(luo_file.args()):
            raise OSError(errno.EBUSY, f"the handler of token {luo_file.token} cannot finish yet")
    while file_set.files:
        luo_file = file_set._pop()
        luo_file.fh.finish(luo_file.args())
        if luo_file.file is not None:
            ident = luo_file.fh.get_id(luo_file.file)
            entry = files.preserved.get(ident)
            if entry is not None and entry[0] is luo_file.file:
                del files.preserved[ident]
            luo_file.file.put()
            luo_file.file = None
        file_set.count -= 1
        file_set.block_set.shrink(file_set.count)
    file_set.block_set.destroy()


def deserialize(files: LuoFiles, file_set: FileSet, files_pa: int, count: int) -> None:
    """luo_file_deserialize(): rebuild ``file_set`` from the chain at
    ``files_pa`` holding ``count`` files.

    Raises OSError: the block chain's EINVAL/ENOSPC, ENOENT for a file whose
    handler is unknown, EINVAL when the chain holds another number of files
    than ``count``. On failure the set is left empty."""
    if not files_pa:
        if count:
            log.warning("file set has no blocks but claims %d files", count)
        return
    file_set.count = 0
    file_set.block_set.restore(files_pa)
    memory = file_set.block_set.kho.memory
    try:
        for entry in file_set.block_set.entries():
            compatible, data, token = abi.FILE_SER.unpack(memory.read(entry, abi.FILE_SER.size))
            fh = files.handler_for(compatible)
            if fh is None:
                log.warning("no handler for compatible %r", abi.cstr(compatible))
                raise OSError(errno.ENOENT, f"no file handler for {abi.cstr(compatible)!r}")
            luo_file = LuoFile(fh, None, token)
            luo_file.serialized_data = data
            file_set._append(luo_file)
            file_set.count += 1
        if file_set.count != count:
            log.warning("file count mismatch: expected %d, found %d", count, file_set.count)
            raise OSError(errno.EINVAL, f"the session claims {count} files, its blocks hold {file_set.count}")
    except OSError:
        file_set.files = []
        file_set.by_token = {}
        file_set.count = 0
        file_set.block_set.destroy()
        raise
