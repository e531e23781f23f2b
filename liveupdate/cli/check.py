"""``liveupdate check UNIT...``: what of a unit's fd store survives the next kexec.

Run it as root on the machine, before ``systemctl kexec``: it lists, per
fd store entry, whether systemd and the kernel will carry it into the next
kernel, and why not when they will not (see :mod:`liveupdate.systemd.check`).
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import List, TextIO

from ..systemd.check import UnitCheck, check_unit
from ._common import CommandError

__all__ = ["add_parser", "render"]

_HINTS = {
    errno.EPERM: "run it as root: it reads PID 1's fds",
    errno.ENOENT: "check the unit name (systemctl list-units), and that systemd runs this machine",
    errno.EIO: "run it on a machine that systemd (>= 261) runs, as root",
}


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="say what of a systemd unit's fd store survives the next kexec",
        description="For each entry of each unit's fd store (systemd >= 261 carries it through "
        "`systemctl kexec` with FileDescriptorStorePreserve=yes), say whether it reaches the next "
        "kernel, asking the kernel itself where it can. Needs root. Exit status 1 when anything "
        "will be lost, with --strict.",
    )
    parser.add_argument("units", nargs="+", metavar="UNIT", help="a unit name, e.g. cache.service")
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    parser.add_argument("--no-probe", action="store_true",
                        help="judge by rule only; do not open /dev/liveupdate to ask the kernel")
    parser.add_argument("--strict", action="store_true", help="exit with 1 when an entry will be lost")
    parser.set_defaults(func=_run, command_path="check")
    return parser


def render(check: UnitCheck, out: TextIO) -> None:
    total = len(check.entries)
    lost = sum(1 for e in check.entries if e.survives is False)
    out.write(f"{check.unit}: {total} fd store entr{'y' if total == 1 else 'ies'}, "
              f"FileDescriptorStorePreserve={check.preserve}; {lost} will be lost at the next kexec\n")
    for note in check.notes:
        out.write(f"  note: {note}\n")
    width = max((len(e.name) for e in check.entries), default=0)
    for e in check.entries:
        mark = {True: "survives", False: "lost    ", None: "unknown "}[e.survives]
        out.write(f"  {mark}  {e.name.ljust(width)}  {e.kind}: {e.reason}\n")


def _run(args: argparse.Namespace) -> int:
    results: List[UnitCheck] = []
    for unit in args.units:
        try:
            results.append(check_unit(unit, probe=not args.no_probe))
        except OSError as exc:
            hint = _HINTS.get(exc.errno or 0, "run it as root on a machine that systemd (>= 261) runs")
            raise CommandError(exc.strerror or str(exc), hint) from None
    if args.json:
        doc = [r.to_dict() for r in results]
        json.dump(doc[0] if len(doc) == 1 else doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in results:
            render(r, sys.stdout)
    if args.strict and any(e.survives is not True for r in results for e in r.entries):
        return 1
    return 0
