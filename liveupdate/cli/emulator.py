"""``liveupdate emulator serve|kexec|status``: the emulator service.

``serve`` runs one emulated kernel that many processes share (through
``liveupdate.open(emulator=SOCKET)`` or ``LIVEUPDATE_EMULATOR=SOCKET``);
``kexec`` reboots it: the sessions still open are handed over, every old
handle turns stale, and the new kernel serves the retrieves.
"""
from __future__ import annotations

import argparse
import errno
from typing import Callable

from ..errors import KernelPanic
from ..service import commands
from . import emulator_systemd
from ._common import CommandError, fail

__all__ = ["add_parser"]

_HINTS = {
    errno.ENOENT: "start one with: liveupdate emulator serve --socket PATH",
    errno.ECONNREFUSED: "the service at that path is gone; start it again",
    errno.EADDRINUSE: "stop that service first, or choose another --socket",
    errno.EACCES: "the service serves only its own user and root",
    errno.ETIMEDOUT: "the service does not answer; is it stopped (SIGSTOP) or overloaded?",
}


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except KernelPanic as exc:
            raise CommandError(f"the emulated kernel cannot boot: {exc}",
                               "the image is corrupt or from an incompatible version; move it away") from None
        except OSError as exc:
            raise fail(exc, _HINTS.get(exc.errno or 0)) from None

    return run


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "emulator",
        help="run the emulator service that many processes share, or kexec it",
        description="An emulated Live Update kernel as a service: sessions live in it while the "
        "processes that made them come and go; `kexec` hands them over to a new emulated kernel.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    commands.add_arguments(actions)
    emulator_systemd.add_action(actions)
    for action in actions.choices.values():
        action.set_defaults(func=_guarded(action.get_default("func")))
    return parser
