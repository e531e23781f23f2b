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
    errno.EINVAL: "the command line may be too long for the new kernel; shorten --append",
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

    load = actions.add_parser("load", help="load KERNEL as the kernel the next kexec starts")
    load.add_argument("kernel", metavar="KERNEL", help="kernel image (bzImage on x86-64, Image on arm64)")
    load.add_argument("--initrd", metavar="FILE", help="initial ramdisk for the new kernel")
    line = load.add_mutually_exclusive_group()
    line.add_argument("--reuse-cmdline", action="store_true", help="give the new kernel this kernel's command line")
    line.add_argument("--append", metavar="ARGS", help="the new kernel's whole command line")
    load.add_argument("--dry-run", action="store_true", help="print the system call instead of making it")
    load.set_defaults(func=_load, command_path="kexec load")

    execute = actions.add_parser("exec", help="jump into the loaded kernel now (like kexec -e)")
    execute.add_argument("--dry-run", action="store_true", help="print the system call instead of making it")
    execute.set_defaults(func=_exec, command_path="kexec exec")

    unload = actions.add_parser("unload", help="forget the loaded kernel")
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
    # Checked here too so that a dry run catches a wrong path as well.
    for label, path in (("kernel", args.kernel), ("initrd", args.initrd)):
        if path is not None and not os.access(path, os.R_OK):
            if not os.path.exists(path):
                raise CommandError(f"the {label} {path!r} does not exist", "check the path")
            raise CommandError(f"the {label} {path!r} is not readable", "run it as root or fix its permissions")
    for note in call.notes:
        sys.stderr.write(f"warning: {note}\n")
    if args.dry_run:
        print(f"would call: {call.describe()}")
        return 0
    size = os.path.getsize(args.kernel)
    progress(f"loading {args.kernel} ({size / 2**20:.1f} MiB) with kexec_file_load ...")
    try:
        kexec.load(args.kernel, initrd=args.initrd, cmdline=args.append, reuse_cmdline=args.reuse_cmdline)
    except OSError as exc:
        raise _hinted(exc, _LOAD_HINTS) from None
    print(f"loaded {args.kernel}: `liveupdate kexec exec` starts it")
    return 0


def _exec(args: argparse.Namespace) -> int:
    call = kexec.plan_execute()
    loaded = kexec.is_loaded()
    if args.dry_run:
        print(f"would call: sync(); {call.describe()}")
        if loaded is False:
            sys.stderr.write("warning: no kernel is loaded: the call would fail with EINVAL\n")
        return 0
    # No check of kexec_loaded here: the kernel's own answer (EINVAL, or
    # EPERM first for a user who may not kexec at all) is the one to show.
    progress("syncing file systems and jumping into the loaded kernel ...")
    try:
        kexec.execute()
    except OSError as exc:
        if exc.errno in _EXEC_HINTS:
            raise _hinted(exc, _EXEC_HINTS) from None
        hint = "the live update refused to hand over a session; see the kernel log (dmesg | grep -i liveupdate)"
        raise fail(exc, hint) from None
    return 1  # not reached: execute() either jumps or raises


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
