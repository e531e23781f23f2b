"""Load a kernel with kexec_file_load and jump into it with reboot().

A live update ends with a kexec: the running kernel hands the preserved
sessions to the next one through Kexec HandOver (KHO). KHO works only with
the in-kernel loader, ``kexec_file_load`` (the same as ``kexec -s``), so this
module uses that call and no other. Both calls go through the binding's cffi
layer in ABI mode (declarations in ``cdefs/kexec.h``): nothing is compiled.

Every call has a ``plan_*`` twin that returns the exact :class:`Syscall` it
would make without making it, for ``--dry-run`` and for logs.

Privileges: loading, unloading and executing all need ``CAP_SYS_BOOT`` and
fail with EPERM without it (also when ``kernel.kexec_load_disabled`` is set
or the kernel is locked down).
"""
from __future__ import annotations

import errno
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from . import _abi
from .errors import make

__all__ = [
    "Syscall",
    "plan_load",
    "plan_unload",
    "plan_execute",
    "load",
    "unload",
    "execute",
    "is_loaded",
    "running_cmdline",
    "syscall_numbers",
]

PathLike = Union[str, "os.PathLike[str]"]

_abi.load_cdefs("kexec.h")
_lib: Any = _abi.ffi.dlopen(None)  # its attributes are the header's constants and syscall()

KEXEC_FILE_UNLOAD: int = _lib.KEXEC_FILE_UNLOAD
KEXEC_FILE_NO_INITRAMFS: int = _lib.KEXEC_FILE_NO_INITRAMFS
LINUX_REBOOT_MAGIC1: int = _lib.LINUX_REBOOT_MAGIC1
LINUX_REBOOT_MAGIC2: int = _lib.LINUX_REBOOT_MAGIC2
LINUX_REBOOT_CMD_KEXEC: int = _lib.LINUX_REBOOT_CMD_KEXEC

# platform.machine() spellings -> (kexec_file_load, reboot).
_NUMBERS: Dict[str, Tuple[int, int]] = {
    "x86_64": (_lib.SYS_KEXEC_FILE_LOAD_X86_64, _lib.SYS_REBOOT_X86_64),
    "amd64": (_lib.SYS_KEXEC_FILE_LOAD_X86_64, _lib.SYS_REBOOT_X86_64),
    "aarch64": (_lib.SYS_KEXEC_FILE_LOAD_AARCH64, _lib.SYS_REBOOT_AARCH64),
    "arm64": (_lib.SYS_KEXEC_FILE_LOAD_AARCH64, _lib.SYS_REBOOT_AARCH64),
}

# Why a kexec call failed, beyond what the errno's own text says.
_DETAILS: Dict[str, Dict[int, str]] = {
    "kexec_file_load": {
        errno.EPERM: "kexec needs CAP_SYS_BOOT (run as root); as root it is refused when "
        "/proc/sys/kernel/kexec_load_disabled is 1 or the kernel is locked down",
        errno.ENOEXEC: "the kernel cannot load this file: give it a kernel image for this "
        "architecture (bzImage on x86-64, Image on arm64)",
        errno.ENOSYS: "this kernel has no kexec_file_load (built without CONFIG_KEXEC_FILE)",
        errno.EBUSY: "another kexec load or unload is in progress",
        errno.EKEYREJECTED: "the kernel requires a signed image and this one's signature was rejected",
        errno.EBADMSG: "the kernel requires a signed image and this one has no valid signature",
    },
    "reboot": {
        errno.EPERM: "kexec needs CAP_SYS_BOOT (run as root)",
        errno.EINVAL: "no kernel is loaded for kexec (load one first), or this process is "
        "not in the initial PID namespace",
    },
}


def syscall_numbers(machine: Optional[str] = None) -> Tuple[int, int]:
    """(kexec_file_load, reboot) system call numbers for ``machine``
    (default: this one, as :func:`platform.machine` names it).

    Raises ENOSYS for an architecture this module does not know."""
    machine = machine or platform.machine()
    try:
        return _NUMBERS[machine]
    except KeyError:
        raise make(
            errno.ENOSYS, "syscall_numbers", "liveupdate.kexec knows x86_64 and aarch64 only", machine=machine
        ) from None


@dataclass(frozen=True)
class Syscall:
    """One system call, described well enough to make it or to print it.

    ``args`` holds (parameter, value, how to show it) triples; a value of
    type :class:`Path` stands for a file descriptor opened read-only on that
    path just before the call (and closed right after)."""

    name: str
    number: int
    args: Tuple[Tuple[str, Any, str], ...]
    notes: Tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """``name(param=shown, ...)`` followed by the syscall number."""
        shown = ", ".join(f"{param}={text}" for param, _, text in self.args)
        return f"{self.name}({shown})  [syscall {self.number} on {platform.machine()}]"

    def argument(self, param: str) -> Any:
        """The value passed as ``param`` (KeyError if there is none)."""
        for name, value, _ in self.args:
            if name == param:
                return value
        raise KeyError(param)


def _cmdline_from(text: str) -> str:
    # Booting loaders add BOOT_IMAGE= naming the image they started; it would
    # be wrong for the next kernel, so it is dropped (kexec-tools does the same).
    return " ".join(word for word in text.split() if not word.startswith("BOOT_IMAGE="))


def running_cmdline(proc: PathLike = "/proc") -> str:
    """The running kernel's command line, as the next kernel should get it.

    Raises the OSError of reading ``<proc>/cmdline`` (ENOENT when /proc is
    not mounted)."""
    path = Path(proc) / "cmdline"
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise make(exc.errno or errno.EIO, "running_cmdline", "cannot read the running command line", path=str(path)) from exc
    return _cmdline_from(text)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_load(
    kernel: PathLike,
    *,
    initrd: Optional[PathLike] = None,
    cmdline: Optional[str] = None,
    reuse_cmdline: bool = False,
    proc: PathLike = "/proc",
    machine: Optional[str] = None,
) -> Syscall:
    """The kexec_file_load call that :func:`load` would make, not made.

    ``cmdline`` is the next kernel's whole command line; ``reuse_cmdline``
    takes the running one's instead (they exclude each other). With neither,
    the next kernel gets an empty command line.

    Raises EINVAL (both command-line choices, or a NUL inside the command
    line), ENOSYS (unknown architecture), and the OSError of reading
    /proc/cmdline for ``reuse_cmdline``."""
    kernel_path = Path(os.fspath(kernel))
    initrd_path = Path(os.fspath(initrd)) if initrd is not None else None
    if reuse_cmdline and cmdline is not None:
        raise make(
            errno.EINVAL, "kexec_load", "give cmdline or reuse_cmdline, not both", kernel=str(kernel_path), cmdline=cmdline
        )
    if reuse_cmdline:
        cmdline = running_cmdline(proc)
    if cmdline is not None and "\0" in cmdline:
        raise make(errno.EINVAL, "kexec_load", "the command line contains a NUL byte", kernel=str(kernel_path), cmdline=cmdline)
    number, _ = syscall_numbers(machine)
    flags = 0 if initrd_path is not None else KEXEC_FILE_NO_INITRAMFS
    args: List[Tuple[str, Any, str]] = [("kernel_fd", kernel_path, f"open({_quote(str(kernel_path))}, O_RDONLY)")]
    if initrd_path is not None:
        args.append(("initrd_fd", initrd_path, f"open({_quote(str(initrd_path))}, O_RDONLY)"))
    else:
        args.append(("initrd_fd", -1, "-1"))
    if cmdline is None:
        # A zero length tells the kernel there is no command line at all.
        args += [("cmdline_len", 0, "0"), ("cmdline", None, "NULL")]
    else:
        # The kernel insists the buffer ends with its NUL and counts it.
        encoded = cmdline.encode("utf-8", errors="surrogateescape")
        args += [("cmdline_len", len(encoded) + 1, str(len(encoded) + 1)), ("cmdline", cmdline, _quote(cmdline))]
    flag_text = f"{flags:#x} (KEXEC_FILE_NO_INITRAMFS)" if flags else "0"
    args.append(("flags", flags, flag_text))
    notes = []
    if cmdline is None or "liveupdate=on" not in cmdline.split():
        notes.append("the command line has no liveupdate=on: the next kernel will not bring the sessions back")
    return Syscall("kexec_file_load", number, tuple(args), tuple(notes))


def plan_unload(machine: Optional[str] = None) -> Syscall:
    """The kexec_file_load call that :func:`unload` would make, not made.

    Raises ENOSYS for an unknown architecture."""
    number, _ = syscall_numbers(machine)
    args = (
        ("kernel_fd", -1, "-1"),
        ("initrd_fd", -1, "-1"),
        ("cmdline_len", 0, "0"),
        ("cmdline", None, "NULL"),
        ("flags", KEXEC_FILE_UNLOAD, f"{KEXEC_FILE_UNLOAD:#x} (KEXEC_FILE_UNLOAD)"),
    )
    return Syscall("kexec_file_load", number, args)


def plan_execute(machine: Optional[str] = None) -> Syscall:
    """The reboot call that :func:`execute` would make, not made.

    Raises ENOSYS for an unknown architecture."""
    _, number = syscall_numbers(machine)
    args = (
        ("magic1", LINUX_REBOOT_MAGIC1, f"{LINUX_REBOOT_MAGIC1:#x} (LINUX_REBOOT_MAGIC1)"),
        ("magic2", LINUX_REBOOT_MAGIC2, f"{LINUX_REBOOT_MAGIC2:#x} (LINUX_REBOOT_MAGIC2)"),
        ("cmd", LINUX_REBOOT_CMD_KEXEC, f"{LINUX_REBOOT_CMD_KEXEC:#x} (LINUX_REBOOT_CMD_KEXEC)"),
        ("arg", None, "NULL"),
    )
    notes = ("the file systems are synced first; services are not stopped (like kexec -e)",)
    return Syscall("reboot", number, args, notes)


def _invoke(call: Syscall, op: str, **op_args: Any) -> None:
    """Open the files the call names, make it, close them; raise on failure."""
    ffi = _abi.ffi
    opened = []
    keep = []  # cffi buffers must outlive the call
    values = []
    try:
        for param, value, _ in call.args:
            if isinstance(value, Path):
                try:
                    fd = os.open(value, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise make(exc.errno or errno.EIO, op, f"cannot open the {param[:-3]}", **{param[:-3]: str(value)}) from exc
                opened.append(fd)
                values.append(ffi.cast("long", fd))
            elif value is None:
                values.append(ffi.cast("long", 0))
            elif isinstance(value, str):
                buf = ffi.new("char[]", value.encode("utf-8", errors="surrogateescape"))
                keep.append(buf)
                values.append(ffi.cast("long", ffi.cast("intptr_t", buf)))
            else:
                values.append(ffi.cast("long", value))
        ffi.errno = 0
        result = _lib.syscall(ffi.cast("long", call.number), *values)
        err = ffi.errno
    finally:
        for fd in opened:
            os.close(fd)
    if result != 0:
        err = err or errno.EIO
        raise make(err, op, _DETAILS.get(call.name, {}).get(err), **op_args)


def load(
    kernel: PathLike,
    *,
    initrd: Optional[PathLike] = None,
    cmdline: Optional[str] = None,
    reuse_cmdline: bool = False,
) -> Syscall:
    """Load ``kernel`` (and ``initrd``) as the kernel the next kexec starts.

    Replaces any kernel loaded before. Returns the call that was made.

    Raises EPERM (no CAP_SYS_BOOT, kexec disabled, lockdown), ENOENT/EACCES
    (kernel or initrd cannot be opened), ENOEXEC (not a loadable kernel
    image), EINVAL (bad command line, e.g. too long), EBUSY (another load in
    progress), ENOMEM/EADDRNOTAVAIL (no room for the image), ENOSYS (no
    kexec_file_load on this kernel or architecture), EKEYREJECTED/EBADMSG
    (signature required)."""
    call = plan_load(kernel, initrd=initrd, cmdline=cmdline, reuse_cmdline=reuse_cmdline)
    _invoke(
        call,
        "kexec_load",
        kernel=os.fspath(kernel),
        initrd=os.fspath(initrd) if initrd is not None else None,
        cmdline=call.argument("cmdline"),
    )
    return call


def unload() -> Syscall:
    """Forget the kernel loaded for kexec (no error if none was loaded).

    Raises EPERM (no CAP_SYS_BOOT), EBUSY, ENOSYS."""
    call = plan_unload()
    _invoke(call, "kexec_unload")
    return call


def execute() -> None:
    """Sync the file systems and jump into the loaded kernel. Never returns
    on success: this process and every other end here, and only what was
    preserved through /dev/liveupdate (and KHO) reaches the next kernel.

    Raises EPERM (no CAP_SYS_BOOT), EINVAL (nothing loaded, or not in the
    initial PID namespace), or the errno with which the kernel's live update
    refused to serialize the sessions (see the kernel log)."""
    call = plan_execute()
    # Like a clean reboot keeps written data: dirty pages do not survive the
    # jump, and the next kernel may read these files.
    os.sync()
    _invoke(call, "kexec_execute")
    raise make(errno.EIO, "kexec_execute", "reboot(LINUX_REBOOT_CMD_KEXEC) returned without jumping")


def is_loaded(sys: PathLike = "/sys") -> Optional[bool]:
    """Whether a kernel is loaded for kexec (``/sys/kernel/kexec_loaded``);
    None when the kernel does not say (no such file)."""
    try:
        text = (Path(sys) / "kernel" / "kexec_loaded").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text == "1"
