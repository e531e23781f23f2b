"""``liveupdate status``: can this machine do a live update, and if not, why.

Reads /proc, /sys, /dev and /boot only; never opens /dev/liveupdate (one
process at a time may hold it). The hidden ``--proc/--sys/--dev/--boot``
options point it at another tree, for tests and for looking at a guest's
files from outside.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from .status_probe import Report, Roots, probe

__all__ = ["add_parser", "render"]

_MARKS = {"ok": "[ok]", "no": "[no]", "unknown": "[??]", "info": "[--]"}


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status",
        help="say whether live update is usable here, and why not",
        description="Check the kernel, its command line, Kexec HandOver and /dev/liveupdate, "
        "and say which backend liveupdate.open() would use. Exit status 0; with --check, "
        "1 when live update is not usable on this kernel.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--check", action="store_true", help="exit with 1 unless live update is usable")
    for name in ("proc", "sys", "dev", "boot"):
        parser.add_argument(f"--{name}", default=f"/{name}", help=argparse.SUPPRESS)
    parser.set_defaults(func=_run, command_path="status")
    return parser


def render(report: Report, out: TextIO) -> None:
    """The report in words, one check per line, with what to do under each
    problem."""
    out.write(report.summary + "\n\n")
    width = max(len(check.label) for check in report.checks)
    for check in report.checks:
        out.write(f"{_MARKS.get(check.status, '[  ]')} {check.label.ljust(width)}  {check.text}\n")
        if check.fix and check.status in ("no", "unknown"):
            out.write(f"     {' ' * width}  fix: {check.fix}\n")
    out.write(f"\nbackend: {report.backend['text']}\n")


def _run(args: argparse.Namespace) -> int:
    report = probe(Roots(proc=args.proc, sys=args.sys, dev=args.dev, boot=args.boot))
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(report, sys.stdout)
    return 1 if args.check and not report.usable else 0
