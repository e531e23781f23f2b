"""``emulator serve|kexec|status``: what both command lines run.

``liveupdate emulator ...`` (:mod:`liveupdate.cli.emulator`) and
``python -m liveupdate.service ...`` share these functions and arguments.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from typing import Any, Callable, Dict, Optional, TextIO

from .. import _timeout
from . import budget, client, paths

__all__ = ["add_arguments", "serve", "run_kexec", "run_status"]


def add_arguments(actions: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``serve``, ``kexec`` and ``status`` actions to ``actions``
    (each sets ``func(args) -> int`` and ``command_path``)."""
    socket_help = ("the service's socket (default: $LIVEUPDATE_EMULATOR, else "
                   f"$XDG_RUNTIME_DIR/{paths.SOCKET_NAME})")

    timeout_help = (f"how long to wait for the service's answer (default: ${client.TIMEOUT_ENV}, else "
                    f"{client.DEFAULT_TIMEOUT:g}; inf waits for ever)")

    serve_p = actions.add_parser("serve", help="run one emulated kernel as a service for many processes",
                                 description="Run an emulated Live Update kernel that processes use through "
                                             "liveupdate.open(emulator=SOCKET) or LIVEUPDATE_EMULATOR=SOCKET. "
                                             "Stops on SIGTERM or SIGINT.")
    serve_p.add_argument("--socket", metavar="PATH", help=socket_help)
    serve_p.add_argument("--image", metavar="PATH",
                         help="keep the preserved memory in this file: boot from it if it exists, replace it "
                              "atomically at each kexec")
    serve_p.add_argument("--ready-fd", metavar="FD", type=int,
                         help="write 'READY' and close this fd once the socket accepts connections")
    budget_help = "(default: %s; see the README's \"Limits of the emulator service\")"
    serve_p.add_argument("--memory-per-client", metavar="SIZE", type=_size,
                         help="memory one client's preserved files may make the service hold, e.g. 512M "
                              + budget_help % "half of --memory-total")
    serve_p.add_argument("--memory-total", metavar="SIZE", type=_size,
                         help="memory all clients' preserved files may make the service hold "
                              + budget_help % "a quarter of the physical memory")
    serve_p.add_argument("--fds-per-client", metavar="N", type=int,
                         help="fds of the service one client's connections, sessions and files may hold "
                              + budget_help % "half of --fds-total")
    serve_p.add_argument("--fds-total", metavar="N", type=int,
                         help="fds of the service all clients may hold "
                              + budget_help % f"the hard RLIMIT_NOFILE less {budget.FD_HEADROOM}")
    serve_p.add_argument("-v", "--verbose", action="store_true", help="log every kexec and refusal")
    serve_p.set_defaults(func=serve_command, command_path="emulator serve")

    kexec_p = actions.add_parser("kexec", help="run an emulated kexec in the service",
                                 description="Serialize the outgoing sessions, invalidate every handle of the "
                                             "old kernel and boot a new one from the preserved memory.")
    kexec_p.add_argument("--socket", metavar="PATH", help=socket_help)
    kexec_p.add_argument("--timeout", type=_timeout.argument, default=None, metavar="SECONDS",
                         help=timeout_help)
    kexec_p.set_defaults(func=kexec_command, command_path="emulator kexec")

    status_p = actions.add_parser("status", help="what the service holds (JSON)")
    status_p.add_argument("--socket", metavar="PATH", help=socket_help)
    status_p.add_argument("--timeout", type=_timeout.argument, default=None, metavar="SECONDS", help=timeout_help)
    status_p.set_defaults(func=status_command, command_path="emulator status")


def _size(text: str) -> int:
    try:
        return budget.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve(socket_path: Optional[str] = None, image: Optional[str] = None, ready_fd: Optional[int] = None,
          verbose: bool = False, emulator_class: Any = None, stderr: Optional[TextIO] = None,
          limits: Optional[Dict[str, Optional[int]]] = None) -> int:
    """Run the service until SIGTERM/SIGINT; returns the exit status.
    ``limits``: budgets to set (the keyword arguments of
    :func:`.budget.default_limits`), the others derived from the machine.

    Raises OSError: EINVAL (no socket path known, a bad budget), EADDRINUSE
    (a service listens there), ENAMETOOLONG; KernelPanic if ``image`` is corrupt."""
    from .kernel import Kernel
    from .server import Server

    out = stderr or sys.stderr
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=out,
                        format="liveupdate emulator: %(message)s")
    path = paths.resolve_socket_path(socket_path)
    if ready_fd is not None:
        _check_ready_fd(ready_fd)  # before anything is bound or said
    budget.raise_fd_limit()
    budgets = budget.default_limits(**(limits or {}))
    kernel = Kernel(image, emulator_class=emulator_class)
    listener = paths.bind_listener(path)
    inode = os.stat(path).st_ino
    try:
        server = Server(kernel, listener, allowed_uids={os.geteuid(), 0}, limits=budgets)
        server.install_signal_handlers()
        if ready_fd is not None:
            # Told before "serving at": a failure here leaves no socket behind
            # and no line that says the service runs.
            try:
                os.write(ready_fd, b"READY\n")
            except OSError as exc:
                raise OSError(exc.errno, f"cannot write READY to --ready-fd {ready_fd}: "
                                         f"{os.strerror(exc.errno or 0)}") from None
            finally:
                os.close(ready_fd)
        where = f", image {kernel.image}" + (" (booted from it)" if kernel.booted_from_image else "") if kernel.image else ""
        out.write(f"liveupdate emulator: serving at {path}{where}; pid {os.getpid()}\n")
        out.flush()
        return server.serve_forever()
    finally:
        listener.close()
        _unlink_if_ours(path, inode)


def _check_ready_fd(fd: int) -> None:
    """EBADF unless ``fd`` is open for writing in this process."""
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except (OSError, OverflowError, ValueError):
        raise OSError(errno.EBADF, f"--ready-fd {fd} is not an open fd of this process "
                                   f"(open it for the service, e.g. `serve --ready-fd 3 3>FILE`)") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise OSError(errno.EBADF, f"--ready-fd {fd} is open read-only; READY cannot be written to it")


def _unlink_if_ours(path: str, inode: int) -> None:
    # Another service may have replaced a socket it found dead: leave theirs.
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def serve_command(args: argparse.Namespace) -> int:
    limits = {name: getattr(args, name) for name in ("memory_per_client", "memory_total", "fds_per_client", "fds_total")}
    return serve(args.socket, args.image, args.ready_fd, args.verbose, limits=limits)


def run_kexec(socket_path: Optional[str] = None, timeout: Optional[float] = None,
              say: Callable[[str], None] = lambda _: None) -> dict:
    """Ask the service to kexec, with every emulated systemd serving it
    (``liveupdate emulator systemd``) doing systemd's part before and
    after, as ``systemctl kexec`` does; returns the service's report.
    Raises OSError."""
    from ..emulator.systemd.control import kexec_with_managers

    path = paths.resolve_socket_path(socket_path)
    return kexec_with_managers(path, lambda: client.kexec(path, timeout), say)


def run_status(socket_path: Optional[str] = None, timeout: Optional[float] = None) -> dict:
    return client.status(paths.resolve_socket_path(socket_path), timeout)


def kexec_command(args: argparse.Namespace) -> int:
    from .kexec_progress import with_progress

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:  # where the service writes its image, for the progress lines
        image = run_status(args.socket, args.timeout).get("image")
    except OSError:
        image = None  # the kexec itself reports why
    info = with_progress(lambda: run_kexec(args.socket, args.timeout, say=say), image, say)
    image = f"; image {info['image']} written" if info.get("image") else ""
    sys.stdout.write(f"emulated kexec done: boot {info['boot']}{image}\n")
    return 0


def status_command(args: argparse.Namespace) -> int:
    sys.stdout.write(json.dumps(run_status(args.socket, args.timeout), indent=2, sort_keys=True) + "\n")
    return 0
