"""``liveupdate emulator systemd UNIT-FILE... [-- COMMAND...]``: run services
under the emulated systemd, over the emulator service.

It loads each unit file (the keys the emulated manager plays; any other is
refused in one line with its file and line), starts the units in their
``After=`` order and serves their sd_notify messages and fd stores until
SIGINT or SIGTERM. ``-- COMMAND...`` runs that command for the (single)
unit in place of its ``ExecStart=``: a unit file written for a deployed
path works unchanged. ``liveupdate emulator kexec`` then does systemd's
part too: this process stops the services and preserves their fd stores in
the ``systemd`` session before the emulated kexec, and hands the fds back
and starts the units after it.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from typing import List, Tuple

from ._common import CommandError

__all__ = ["add_action"]



def add_action(actions: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    parser = actions.add_parser(
        "systemd",
        help="run services from their unit files under an emulated systemd",
        description="Run services under an emulated systemd over the emulator service: their "
        "sd_notify messages and fd stores as systemd 262 keeps them, LUOSession= sessions, and "
        "systemd's part of `liveupdate emulator kexec`. Runs until SIGINT or SIGTERM.",
        usage="liveupdate emulator systemd [--socket PATH] UNIT-FILE... [-- COMMAND...]",
    )
    parser.add_argument("--socket", help="the emulator service (default: $LIVEUPDATE_EMULATOR, "
                        "else $XDG_RUNTIME_DIR/liveupdate-emulator.sock)")
    parser.add_argument("--ready-file", metavar="PATH",
                        help="write this process's pid to PATH once the units are started")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="UNIT-FILE... [-- COMMAND...]",
                        help="unit files; after --, the command to run for the single unit")
    parser.set_defaults(func=_run, command_path="emulator systemd")
    return parser


def _split(rest: List[str]) -> Tuple[List[str], List[str]]:
    if "--" in rest:
        at = rest.index("--")
        return rest[:at], rest[at + 1:]
    return rest, []


def _run(args: argparse.Namespace) -> int:
    from ..emulator.systemd.control import ControlServer
    from ..emulator.systemd.fixture import with_command
    from ..emulator.systemd.manager import EmulatedSystemd
    from ..emulator.systemd.unit_file import parse_unit, read_unit_file
    from ..service.paths import resolve_socket_path

    units, command = _split(args.rest)
    if not units:
        raise CommandError("no unit file given", "liveupdate emulator systemd UNIT-FILE... [-- COMMAND...]", code=2)
    if command and len(units) != 1:
        raise CommandError("-- COMMAND replaces the ExecStart= of one unit, and more were given",
                           "give one unit file with -- COMMAND, or none", code=2)
    if command and os.sep in command[0] and not os.path.isabs(command[0]):
        # typed in a shell, so relative to where it was typed; systemd
        # itself takes only absolute paths (or names on $PATH)
        command[0] = os.path.abspath(command[0])
    texts = []
    for path in units:
        name = os.path.basename(path)
        try:
            text = read_unit_file(path)
            text = with_command(text, command) if command else text
            parse_unit(text, name, source=path)  # what the manager does not play, with its line
        except OSError as exc:
            why = getattr(exc, "detail", None) or exc.strerror or str(exc)
            raise CommandError(why if why.startswith(path) else f"{path}: {why}",
                               "give a unit file; the emulated systemd refuses the keys it does not play",
                               code=2) from None
        texts.append((name, text))
    socket = resolve_socket_path(args.socket)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmulatedSystemd(socket=socket) as manager:
        for name, text in texts:
            manager.load(text, name=name)
        for name in manager.enabled() + [n for n in manager.services if n not in manager.enabled()]:
            try:
                manager.start(name)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ECHILD):
                    where = f": {exc.filename}" if exc.filename else ""
                    raise CommandError(f"{name}: {exc.strerror}{where}",
                                       "check its ExecStart= (or the command after --)", code=1) from None
                raise
        control = ControlServer(manager, socket)
        try:
            print(f"emulated systemd: {len(texts)} unit(s) started over {socket}; pid {os.getpid()}; "
                  f"`liveupdate emulator kexec` does systemd's part; logs in {manager.directory}", flush=True)
            if args.ready_file:
                with open(args.ready_file, "w") as f:
                    f.write(f"{os.getpid()}\n")
            while not stop.wait(3600):
                pass
        finally:
            control.close()
    print("emulated systemd: services stopped", file=sys.stderr)
    return 0
