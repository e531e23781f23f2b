"""``python -m liveupdate.service serve|kexec|status``: the emulator service
without the ``liveupdate`` command (same arguments as ``liveupdate emulator``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import KernelPanic
from . import commands


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m liveupdate.service",
                                     description="The Live Update emulator service.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    commands.add_arguments(actions)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OSError as exc:
        sys.stderr.write(f"{parser.prog} {args.action}: {exc.strerror or exc}\n")
        return 1
    except KernelPanic as exc:
        sys.stderr.write(f"{parser.prog} {args.action}: the emulated kernel cannot boot: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
