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
import stat
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

#: The kernel's COMMAND_LINE_SIZE on x86-64 and arm64 (arch/*/include/asm/setup.h):
#: the bytes of a command line, its terminating NUL included, that the next
#: kernel takes; a longer one is EINVAL from kexec_file_load.
COMMAND_LINE_SIZE = 2048
#: The largest kernel image and initrd a load accepts. The kernel reads both
#: whole into its memory before it looks at them; real kernel images are
#: 10 to 100 MB and initrds rarely reach 1 GB, so a file above these is a
#: mistake (a disk image, a sparse file) that would only exhaust memory.
KERNEL_MAX = 512 << 20
INITRD_MAX = 2 << 30
_CMDLINE_SHOWN = 120  # characters of a command line an error message shows

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
        # Bounded and non-blocking: a FIFO or /dev/zero in its place must
        # not hang the load; the kernel's own is under COMMAND_LINE_SIZE.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 64 * 1024)
        finally:
            os.close(fd)
    except OSError as exc:
        raise make(exc.errno or errno.EIO, "running_cmdline", "cannot read the running command line", path=str(path)) from exc
    return _cmdline_from(raw.decode("utf-8", errors="surrogateescape"))


def _quote(text: str) -> str:
    """``text`` in double quotes, C style, with every character that is not
    printable escaped: what --append holds must not drive the terminal."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _shown(cmdline: Optional[str]) -> Optional[str]:
    """A command line as an error message shows it: the start of it only."""
    if cmdline is None or len(cmdline) <= _CMDLINE_SHOWN:
        return cmdline
    return f"{cmdline[:_CMDLINE_SHOWN]}... ({len(cmdline)} characters)"


def _path_arg(value: Any, label: str) -> Path:
    """A kernel or initrd path; EINVAL for an empty one (Path('') would be
    the current directory)."""
    try:
        text = os.fspath(value)
    except TypeError:
        raise make(errno.EINVAL, "kexec_file_load", f"the {label} is a path, not {type(value).__name__}",
                   **{label: repr(value)}) from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise make(errno.EINVAL, "kexec_file_load", f"the {label} path is empty", **{label: text})
    return Path(text)


def open_image(path: Path, label: str, limit: int) -> int:
    """An fd on the kernel or initrd at ``path``, checked for what
    kexec_file_load can take: opened without blocking (a FIFO would block
    the open for ever), a regular file, not empty, at most ``limit`` bytes.

    Raises OSError: ENOENT, ELOOP (a symbolic link loop), EACCES, EISDIR,
    EINVAL (a FIFO, a device), EFBIG (above ``limit``), ENOEXEC (empty)."""
    args = {label: str(path)}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        err = exc.errno or errno.EIO
        why = {
            errno.ENOENT: f"the {label} does not exist",
            errno.ELOOP: f"the {label} path is a loop of symbolic links",
            errno.EACCES: f"the {label} is not readable by this user",
            errno.EISDIR: f"the {label} is a directory",
        }.get(err, f"cannot open the {label}")
        raise make(err, "kexec_file_load", why, **args) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise make(errno.EISDIR, "kexec_file_load", f"the {label} is a directory", **args)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
                stat.S_ISBLK(st.st_mode) else "not a file"
            raise make(errno.EINVAL, "kexec_file_load", f"the {label} is {kind}, not a regular file", **args)
        if st.st_size == 0:
            raise make(errno.ENOEXEC, "kexec_file_load", f"the {label} is empty", **args)
        if st.st_size > limit:
            raise make(errno.EFBIG, "kexec_file_load",
                       f"the {label} is {st.st_size} bytes, more than the {limit >> 20} MiB any real one is",
                       **args)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_image(path: Path, label: str, limit: int) -> None:
    os.close(open_image(path, label, limit))


def _encode_cmdline(cmdline: Any, kernel: Path) -> bytes:
    """The command line's bytes; EINVAL for what the kernel cannot take."""
    if not isinstance(cmdline, str):
        raise make(errno.EINVAL, "kexec_file_load", f"the command line is a str, not {type(cmdline).__name__}",
                   kernel=str(kernel), cmdline=_shown(repr(cmdline)))
    if "\0" in cmdline:
        raise make(errno.EINVAL, "kexec_file_load", "the command line contains a NUL byte", kernel=str(kernel),
                   cmdline=_shown(cmdline))
    try:
        # surrogateescape: bytes of /proc/cmdline that were not UTF-8 go back as they were.
        encoded = cmdline.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as exc:
        raise make(errno.EINVAL, "kexec_file_load",
                   f"the command line holds {exc.object[exc.start]!r} at {exc.start}, a lone surrogate no byte "
                   f"encodes", kernel=str(kernel), cmdline=_shown(cmdline)) from None
    if len(encoded) + 1 > COMMAND_LINE_SIZE:
        raise make(errno.EINVAL, "kexec_file_load",
                   f"the command line is {len(encoded)} bytes; the kernel takes at most {COMMAND_LINE_SIZE - 1} "
                   f"(COMMAND_LINE_SIZE {COMMAND_LINE_SIZE}, with its NUL)", kernel=str(kernel),
                   cmdline=_shown(cmdline))
    return encoded


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

    The kernel and initrd are checked as :func:`open_image` says, so that a
    dry run refuses what the load would.

    Raises EINVAL (both command-line choices; an empty path; a command line
    that is not a str, holds a NUL or a lone surrogate, or is longer than
    COMMAND_LINE_SIZE; a FIFO or device), ENOENT, ELOOP, EACCES, EISDIR,
    EFBIG, ENOEXEC (an empty file), ENOSYS (unknown architecture), and the
    OSError of reading /proc/cmdline for ``reuse_cmdline``."""
    kernel_path = _path_arg(kernel, "kernel")
    initrd_path = _path_arg(initrd, "initrd") if initrd is not None else None
    if reuse_cmdline and cmdline is not None:
        raise make(errno.EINVAL, "kexec_file_load", "give cmdline or reuse_cmdline, not both",
                   kernel=str(kernel_path), cmdline=_shown(cmdline) if isinstance(cmdline, str) else repr(cmdline))
    if reuse_cmdline:
        cmdline = running_cmdline(proc)
    encoded = _encode_cmdline(cmdline, kernel_path) if cmdline is not None else None
    number, _ = syscall_numbers(machine)
    _check_image(kernel_path, "kernel", KERNEL_MAX)
    if initrd_path is not None:
        _check_image(initrd_path, "initrd", INITRD_MAX)
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
        assert encoded is not None
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
                # Checked again on the very fd the kernel reads: the file
                # may have been swapped for a FIFO since the plan.
                label = param[:-3]
                fd = open_image(value, label, KERNEL_MAX if label == "kernel" else INITRD_MAX)
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
        "kexec_file_load",
        kernel=str(call.argument("kernel_fd")),
        initrd=str(call.argument("initrd_fd")) if initrd is not None else None,
        cmdline=_shown(call.argument("cmdline")),
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
