"""``liveupdate kexec load|exec|unload``: the kexec that ends a live update.

Loading uses kexec_file_load, the only loader that hands the preserved
sessions over (Kexec HandOver); ``exec`` then jumps into the loaded kernel
at once, like ``kexec -e``. ``--dry-run`` prints the exact system call and
makes none of them.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Mapping

from .. import kexec
from ._common import CommandError, fail, progress

__all__ = ["add_parser"]

_PRIVILEGE_HINT = "run it as root, e.g. with sudo"
_ROOT_PRIVILEGE_HINT = (
    "root was refused: check that /proc/sys/kernel/kexec_load_disabled is 0 (else only a reboot "
    "allows kexec again) and that the kernel is not locked down (Secure Boot)"
)

_LOAD_HINTS = {
    errno.EPERM: _PRIVILEGE_HINT,
    errno.ENOSYS: "this kernel cannot kexec_file_load (CONFIG_KEXEC_FILE is off); `liveupdate status` says more",
    errno.ENOEXEC: "give an uncompressed kernel image for this machine (bzImage on x86-64, Image on arm64)",
    errno.EINVAL: "check the files and the command line named above",
    errno.ELOOP: "the path is a loop of symbolic links; give the file itself",
    errno.EISDIR: "give the kernel image file, not its directory",
    errno.EFBIG: "that is no kernel image or initrd; check the path",
    errno.EBUSY: "another kexec load is running; try again when it is done",
    errno.EKEYREJECTED: "this kernel only loads signed images; sign the image or boot without lockdown",
    errno.EBADMSG: "this kernel only loads signed images; sign the image or boot without lockdown",
    errno.ENOMEM: "not enough free memory for the image; with KHO, a larger kho_scratch= may help",
    errno.EADDRNOTAVAIL: "no room for the image in the KHO scratch area; boot with a larger kho_scratch=",
    errno.ENOENT: "check the path of the kernel and the initrd",
    errno.EACCES: "the kernel or initrd is not readable by this user",
}

_EXEC_HINTS = {
    errno.EPERM: _PRIVILEGE_HINT,
    errno.EINVAL: "load a kernel first: liveupdate kexec load KERNEL --reuse-cmdline",
}


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "kexec",
        help="load a kernel for a live update kexec, or start it",
        description="Load the next kernel with kexec_file_load (which hands Live Update "
        "sessions over) and jump into it. Needs root (CAP_SYS_BOOT) unless --dry-run.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    load = actions.add_parser(
        "load", help="load KERNEL as the kernel the next kexec starts",
        description="Load KERNEL (and --initrd) with kexec_file_load as the kernel the next kexec starts, "
        "replacing any loaded before. The new kernel's command line is --append ARGS or, with "
        "--reuse-cmdline, this kernel's; it needs liveupdate=on to bring the sessions back. Files must be "
        f"regular and at most {kexec.KERNEL_MAX >> 20} MiB (kernel) / {kexec.INITRD_MAX >> 20} MiB (initrd), "
        f"the command line under {kexec.COMMAND_LINE_SIZE} bytes. Needs root unless --dry-run.")
    load.add_argument("kernel", metavar="KERNEL", help="kernel image (bzImage on x86-64, Image on arm64)")
    load.add_argument("--initrd", metavar="FILE", help="initial ramdisk for the new kernel")
    line = load.add_mutually_exclusive_group()
    line.add_argument("--reuse-cmdline", action="store_true", help="give the new kernel this kernel's command line")
    line.add_argument("--append", metavar="ARGS", help="the new kernel's whole command line")
    load.add_argument("--dry-run", action="store_true", help="print the system call instead of making it")
    load.set_defaults(func=_load, command_path="kexec load")

    execute = actions.add_parser(
        "exec", help="jump into the loaded kernel now (like kexec -e)",
        description="Sync the file systems and jump into the kernel that `liveupdate kexec load` loaded, at "
        "once: every process ends here, and only what was preserved through /dev/liveupdate reaches the next "
        "kernel. Services are not stopped first (use systemctl kexec for that). Needs root unless --dry-run.")
    execute.add_argument("--dry-run", action="store_true", help="print the system call instead of making it")
    execute.set_defaults(func=_exec, command_path="kexec exec")

    unload = actions.add_parser(
        "unload", help="forget the loaded kernel",
        description="Forget the kernel loaded for kexec (kexec_file_load with KEXEC_FILE_UNLOAD); nothing "
        "happens if none is loaded. Needs root unless --dry-run.")
    unload.add_argument("--dry-run", action="store_true", help="print the system call instead of making it")
    unload.set_defaults(func=_unload, command_path="kexec unload")
    return parser


def _hinted(exc: OSError, hints: Mapping[int, str]) -> CommandError:
    hint = hints.get(exc.errno or 0)
    if exc.errno == errno.EPERM and os.geteuid() == 0:
        hint = _ROOT_PRIVILEGE_HINT
    return fail(exc, hint)


def _load(args: argparse.Namespace) -> int:
    try:
        call = kexec.plan_load(args.kernel, initrd=args.initrd, cmdline=args.append, reuse_cmdline=args.reuse_cmdline)
    except OSError as exc:
        raise _hinted(exc, _LOAD_HINTS) from None
    # plan_load checked the files (regular, bounded, readable) and the
    # command line, so a dry run refuses what the load would.
    for note in call.notes:
        sys.stderr.write(f"warning: {note}\n")
    if args.dry_run:
        print(f"would call: {call.describe()}")
        return 0
    shown = kexec._quote(args.kernel)  # a path may hold control characters too
    try:
        size = os.path.getsize(args.kernel)
    except OSError:
        size = 0
    progress(f"loading {shown} ({size / 2**20:.1f} MiB) with kexec_file_load ...")
    try:
        kexec.load(args.kernel, initrd=args.initrd, cmdline=args.append, reuse_cmdline=args.reuse_cmdline)
    except OSError as exc:
        raise _hinted(exc, _LOAD_HINTS) from None
    print(f"loaded {shown}: `liveupdate kexec exec` starts it")
    return 0


def _exec(args: argparse.Namespace) -> int:
    call = kexec.plan_execute()
    loaded = kexec.is_loaded()
    if args.dry_run:
        print(f"would call: sync(); {call.describe()}")
        if loaded is False:
            sys.stderr.write("warning: no kernel is loaded: the call would fail with EINVAL\n")
        return 0
    # Nothing loaded: say so before saying we jump. A user who may not
    # kexec at all gets the kernel's own answer (EPERM comes first there).
    if loaded is False and _may_boot():
        raise CommandError("no kernel is loaded for kexec: there is nothing to jump into", _EXEC_HINTS[errno.EINVAL])
    progress("syncing file systems and jumping into the loaded kernel ...")
    try:
        kexec.execute()
    except OSError as exc:
        if exc.errno in _EXEC_HINTS:
            raise _hinted(exc, _EXEC_HINTS) from None
        hint = "the live update refused to hand over a session; see the kernel log (dmesg | grep -i liveupdate)"
        raise fail(exc, hint) from None
    return 1  # not reached: execute() either jumps or raises


def _may_boot() -> bool:
    """Whether this process holds CAP_SYS_BOOT (what kexec needs)."""
    from .status_sources import has_cap, read_text
    from pathlib import Path

    text, _ = read_text(Path("/proc/self/status"))
    return has_cap(text, 22) is True


def _unload(args: argparse.Namespace) -> int:
    call = kexec.plan_unload()
    if args.dry_run:
        print(f"would call: {call.describe()}")
        return 0
    try:
        kexec.unload()
    except OSError as exc:
        raise _hinted(exc, _LOAD_HINTS) from None
    print("no kernel is loaded for kexec now")
    return 0
