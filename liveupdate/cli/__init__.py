"""The ``liveupdate`` command: see and drive live updates.

Each subcommand is a module of this package exposing ``add_parser(subparsers)``,
which registers its parser and sets ``func`` (``func(args) -> int``) as the
parser default. :data:`SUBCOMMANDS` lists them in the order ``--help`` shows.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from typing import List, Optional, Sequence

from ._common import CommandError, fail

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

PROG = "liveupdate"

#: The subcommand modules, by module name inside this package. A module that
#: is not there (yet) is left out of the command rather than breaking it.
SUBCOMMANDS = ("status", "check", "inspect", "hold", "kexec", "emulator")


def _modules() -> "List[types.ModuleType]":
    found: "List[types.ModuleType]" = []
    for name in SUBCOMMANDS:
        qualified = f"{__name__}.{name}"
        try:
            found.append(importlib.import_module(qualified))
        except ModuleNotFoundError as exc:
            if exc.name != qualified:
                raise  # the module exists but needs something missing: say so
    return found


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, every available subcommand included."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Linux Live Update (/dev/liveupdate): check this machine, keep "
        "files across a kexec, inspect what is preserved.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _modules():
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns
    the exit status: 0 done, 1 failed (one line on stderr), 2 bad usage,
    130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    prog = f"{PROG} {getattr(args, 'command_path', args.command)}"
    try:
        return int(func(args) or 0)
    except CommandError as exc:
        sys.stderr.write(exc.line(prog) + "\n")
        return exc.code
    except BrokenPipeError:
        # The reader went away (| head): not an error of ours. Point stdout at
        # nothing so that the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        sys.stderr.write(fail(exc).line(prog) + "\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
