"""The file-handler contract (struct liveupdate_file_ops), and the registry.

A file handler makes one kind of file live-updatable, as in the kernel
(``include/linux/liveupdate.h``): LUO (:mod:`.luo_file`) owns the sessions,
tokens, block chains and file references; the handler owns what its files
need across a kexec. :class:`FileHandler` mirrors ``struct
liveupdate_file_ops``:

====================  ========  ===============================================
operation             kernel    here
====================  ========  ===============================================
can_preserve(file)    required  abstract: does this handler take ``file``?
preserve(args)        required  abstract: save the state, set
                                ``args.serialized_data`` (a physical address)
                                and ``args.private_data``; raise OSError
unpreserve(args)      required  abstract: undo preserve (session closed)
freeze(args)          optional  at reboot; default: nothing to do
unfreeze(args)        optional  undo freeze (a later failure); default: nothing
retrieve(args)        required  abstract: in the next kernel, rebuild the file
                                into ``args.file`` (a KernelFile); raise OSError
can_finish(args)      optional  may the session finish now? default: yes
finish(args)          required  abstract: let go (``args.retrieve_status`` says
                                whether it was retrieved)
get_id(file)          optional  what identifies a file (one preserve per id);
                                default: its inode (the kernel's default is the
                                struct file, which user space cannot see)
====================  ========  ===============================================

Beyond the kernel's ops, a handler says how its serialized state reads
without booting: :meth:`FileHandler.walk` (used by
:func:`liveupdate.emulator.walk` and so by ``liveupdate inspect``) returns
records for one file; a record with ``inspect_key``, ``inspect_fields()``
and ``inspect_summary()`` shows in ``inspect`` under that key and in its
text line.

Registration: a handler module calls :func:`register` with its class (as a
kernel module calls liveupdate_register_file_handler() at init); every
kernel the emulator boots makes one instance of each registered class
(``cls(kho, in_use)``: its KHO, and LUO's index of files held by sessions).
The built-in handler (:mod:`.memfd_luo`) registers itself when first
needed. A compatible string is at most 47 bytes, registered once (EEXIST).
"""
from __future__ import annotations

import abc
import errno
import importlib
from typing import TYPE_CHECKING, Any, Container, Dict, Hashable, List, NamedTuple, Type

from . import abi

if TYPE_CHECKING:  # pragma: no cover
    from .kfile import KernelFile
    from .kho import KHO, PhysicalMemory

__all__ = ["FileHandler", "Problem", "register", "unregister", "registered", "handler_class"]

#: Handlers of the emulator itself, imported (so registered) on first use.
_BUILTIN = ("liveupdate.emulator.memfd_luo",)
_registry: Dict[bytes, Type["FileHandler"]] = {}
_builtins_loaded = False


class Problem(NamedTuple):
    """Something in preserved memory that does not check out (a walk record)."""

    where: str
    message: str


class FileHandler(abc.ABC):
    """One registered handler bound to one kernel (see the module doc)."""

    #: The handler's compatible string (at most 47 bytes).
    compatible: bytes = b""

    def __init__(self, kho: "KHO", in_use: Container[Any] = ()) -> None:
        self.kho = kho
        # LUO's index of files held by sessions (luo_preserved_files).
        self.in_use: Container[Any] = in_use

    # -- required --------------------------------------------------------------
    @abc.abstractmethod
    def can_preserve(self, file: "KernelFile") -> bool: ...

    @abc.abstractmethod
    def preserve(self, args: Any) -> None: ...

    @abc.abstractmethod
    def unpreserve(self, args: Any) -> None: ...

    @abc.abstractmethod
    def retrieve(self, args: Any) -> None: ...

    @abc.abstractmethod
    def finish(self, args: Any) -> None: ...

    # -- optional (the kernel's NULL ops) ------------------------------------
    def freeze(self, args: Any) -> None:
        """Nothing to do at reboot."""
        return None

    def unfreeze(self, args: Any) -> None:
        """Nothing to undo."""
        return None

    def can_finish(self, args: Any) -> bool:
        return True

    def get_id(self, file: "KernelFile") -> Hashable:
        return file.ident

    # -- reading preserved memory without a kernel ---------------------------------
    @classmethod
    def walk(cls, memory: "PhysicalMemory", pa: int, token: int, visited: Dict[int, str]) -> List[Any]:
        """Records describing the file whose serialized data is at ``pa``.
        ``visited`` maps every page the walk decoded so far to who reached
        it: decode a page only once (record it there), report a page
        reached again as a :class:`Problem`. Default: nothing known."""
        return []


def register(cls: Type[FileHandler]) -> Type[FileHandler]:
    """liveupdate_register_file_handler(): every kernel booted from now on
    has one. Usable as a class decorator. Raises OSError EINVAL (not a
    FileHandler, or a compatible string empty or over 47 bytes), EEXIST (a
    handler of that compatible string is registered)."""
    if not (isinstance(cls, type) and issubclass(cls, FileHandler)) or getattr(cls, "__abstractmethods__", None):
        raise OSError(errno.EINVAL, f"{cls!r} does not implement the FileHandler operations")
    compatible = cls.compatible
    if not compatible or len(compatible) > abi.HNDL_COMPAT_LENGTH - 1 or b"\0" in compatible:
        raise OSError(errno.EINVAL, f"compatible string {compatible!r} must be 1 to "
                                    f"{abi.HNDL_COMPAT_LENGTH - 1} bytes without NUL")
    other = _registry.get(compatible)
    if other is not None and other is not cls:
        raise OSError(errno.EEXIST, f"file handler {compatible!r} already registered ({other.__qualname__})")
    _registry[compatible] = cls
    return cls


def unregister(cls: Type[FileHandler]) -> None:
    """liveupdate_unregister_file_handler(): kernels booted later lack it."""
    if _registry.get(cls.compatible) is cls:
        del _registry[cls.compatible]


def registered() -> List[Type[FileHandler]]:
    """The registered handler classes, in registration order (the order in
    which LUO asks them ``can_preserve``)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in _BUILTIN:
            importlib.import_module(name)
    return list(_registry.values())


def handler_class(compatible_field: bytes) -> "Type[FileHandler] | None":
    """The handler class whose compatible string a serialized field holds
    (the string followed by a NUL), or None."""
    for cls in registered():
        if compatible_field[: len(cls.compatible) + 1] == cls.compatible + b"\0":
            return cls
    return None
