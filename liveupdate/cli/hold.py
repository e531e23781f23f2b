"""``liveupdate hold NAME FILE...`` and ``liveupdate release NAME``.

A session lives as long as an fd of it is open, so someone has to keep it
open until the kexec. ``hold`` creates the session, preserves the files and
leaves a small background process holding the session fd; ``release``
stops that process, which closes the session: the kernel then stops
preserving its files. After a real kexec the holder is simply gone, as is
every process.

Files are paths of memfds (``/proc/PID/fd/N``), inherited fds (``fd:N``),
or, with ``--copy``, any readable file copied into a fresh memfd first.
Each may carry its token (``TOKEN=FILE``; decimal or 0x hex); the others get
the next free number from 0.

The holder's record (pid, session, tokens) is a JSON file in the state
directory: ``$XDG_RUNTIME_DIR/liveupdate/hold``, else
``/run/liveupdate/hold`` for root; ``--state-dir`` to choose.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import stat
from typing import Any, Dict, List, Optional, Tuple

import liveupdate

from .. import _timeout
from . import hold_record
from ._common import CommandError, fail

__all__ = ["add_parser", "state_dir"]

STOP_TIMEOUT = 10.0


def add_parser(subparsers: Any) -> None:
    hold = subparsers.add_parser(
        "hold",
        help="preserve files in a new session and keep it alive until the kexec",
        # Written out, not taken from __doc__: python -OO strips docstrings,
        # and --help is plain text, not the docstring's markup.
        description="Create session NAME, preserve the files in it and leave a small background process "
        "holding the session until the kexec (`liveupdate release NAME` stops it). Each FILE is the path "
        "of a memfd (/proc/PID/fd/N), an inherited fd (fd:N), or with --copy any readable file copied into "
        "a new memfd; TOKEN=FILE gives its token (decimal or 0x hex), the others get the next free number "
        "from 0.",
    )
    hold.add_argument("name", metavar="NAME", help="session name (1 to 63 bytes)")
    hold.add_argument("files", metavar="[TOKEN=]FILE", nargs="+",
                      help="a memfd path (/proc/PID/fd/N), fd:N for an inherited fd, or any file with --copy")
    hold.add_argument("--copy", action="store_true", help="copy files that are not memfds into new memfds")
    # argparse reads any word that starts with '-' and is not a negative
    # number as an option, so "-1=FILE" would be "unrecognized arguments".
    # hold has no option that starts with a digit: a '-' and a digit is a
    # TOKEN=FILE (whose token _parse_token then refuses with its reason).
    hold._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d[^=]*=")
    _common_options(hold)
    hold.set_defaults(func=run_hold)

    release = subparsers.add_parser(
        "release",
        help="stop holding a session: its files are no longer preserved",
        description="Stop the process holding session NAME (identified by its pid and start time, never "
        "another process); closing the session makes the kernel drop its files. After an emulated kexec the "
        "session was already handed over: the holder only held a stale handle.",
    )
    release.add_argument("name", metavar="NAME", help="the session name given to `liveupdate hold`")
    _common_options(release)
    release.set_defaults(func=run_release)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--emulator", metavar="SOCKET", help="use the emulator service at SOCKET")
    parser.add_argument("--state-dir", metavar="DIR", help="where holders keep their records")
    parser.add_argument("--timeout", type=_timeout.argument, default=10.0, metavar="SECONDS",
                        help="how long to wait for the device if another process holds it (default 10; inf: "
                             "for ever)")


def state_dir(explicit: Optional[str] = None) -> str:
    """Where the holders' records live (see the module doc)."""
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "liveupdate", "hold")
    if os.geteuid() == 0:
        return "/run/liveupdate/hold"
    raise CommandError("no place for the holder's record", "set XDG_RUNTIME_DIR or pass --state-dir DIR")


def _record_path(directory: str, name: str) -> str:
    # Names may hold '/' or any byte but NUL: keep the file name safe.
    safe = name.encode("utf-8", "surrogateescape").hex()
    return os.path.join(directory, f"{safe}.json")


def _parse_token(text: str, spec: str) -> int:
    try:
        token = int(text, 0)
    except ValueError:
        raise CommandError(f"{spec!r}: {text!r} is not a token", "write TOKEN=FILE with a number, e.g. 7=FILE or 0x10=FILE",
                           code=2) from None
    if not 0 <= token < 2**64:
        raise CommandError(f"{spec!r}: token {token} is out of range", "tokens are 0 to 2**64-1", code=2)
    return token


def _is_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def _open_file(path: str, copy: bool) -> int:
    """An fd for one FILE argument, owned by the caller."""
    if path.startswith("fd:"):
        try:
            return os.dup(int(path[3:]))
        except ValueError:
            raise CommandError(f"{path!r} is not fd:NUMBER", code=2) from None
        except OSError as exc:
            raise fail(exc, f"fd {path[3:]} is not open in this process; pass it when starting the command") from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EISDIR):
            raise fail(exc) from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc2:
            raise fail(exc2) from None
    if _is_memfd(fd):
        return fd
    if not copy:
        os.close(fd)
        raise CommandError(f"{path} is not a memfd: the kernel preserves memfds only",
                           "pass --copy to copy it into a new memfd, or give /proc/PID/fd/N of a memfd")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CommandError(f"{path} is not a regular file", "--copy copies regular files only")
        memfd = os.memfd_create(os.path.basename(path) or "copy", os.MFD_CLOEXEC)
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(memfd, view):]
        os.lseek(memfd, 0, os.SEEK_SET)
        return memfd
    finally:
        os.close(fd)


def _files(specs: List[str], copy: bool) -> List[Tuple[int, int, str]]:
    """(token, fd, spec) for every FILE argument; tokens as given or next free."""
    wanted: List[Tuple[Optional[int], str, str]] = []
    for spec in specs:
        token_text, sep, path = spec.partition("=")
        if sep and not token_text.startswith(("/", "fd:", ".")):
            wanted.append((_parse_token(token_text, spec), path, spec))
        else:
            wanted.append((None, spec, spec))
    taken = {token for token, _, _ in wanted if token is not None}
    if len(taken) != len([t for t, _, _ in wanted if t is not None]):
        raise CommandError("the same token is given twice", "each file needs its own token", code=2)
    result: List[Tuple[int, int, str]] = []
    next_token = 0
    try:
        for token, path, spec in wanted:
            if token is None:
                while next_token in taken:
                    next_token += 1
                token = next_token
                taken.add(token)
            result.append((token, _open_file(path, copy), spec))
    except BaseException:
        for _, fd, _ in result:
            os.close(fd)
        raise
    return result


def _open_device(args: argparse.Namespace) -> liveupdate.Device:
    if args.emulator:
        try:
            return liveupdate.open(emulator=args.emulator, timeout=args.timeout)
        except OSError as exc:
            # open()'s message names the device path it was given
            # (/dev/liveupdate), which is not what --emulator asked for.
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise CommandError(f"no emulator service is listening at {args.emulator}",
                                   f"start one with: liveupdate emulator serve --socket {args.emulator}") from None
            raise
    if not os.path.exists(liveupdate.DEFAULT_PATH) and not os.environ.get("LIVEUPDATE_EMULATOR"):
        raise CommandError(
            f"no {liveupdate.DEFAULT_PATH} here, and an in-process emulator would die with the holder",
            "on a real LUO kernel boot with liveupdate=on; for emulation start `liveupdate emulator serve` and set "
            "LIVEUPDATE_EMULATOR=SOCKET or pass --emulator SOCKET")
    return liveupdate.open(timeout=args.timeout)


def run_hold(args: argparse.Namespace) -> int:
    directory = state_dir(args.state_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    record = _record_path(directory, args.name)
    found = _holder_alive(record)
    if found is not None:
        found[1].close()
        raise CommandError(f"session {args.name!r} is already held", f"`liveupdate release {args.name}` first")
    files = _files(args.files, args.copy)
    # The holder reports back through this pipe: "ok" or one error line.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder
        os.close(r)
        try:
            os.setsid()
            code = _hold(args, files, record, w)
        except BaseException:  # never return into the parent's code
            code = 1
        os._exit(code)
    os.close(w)
    for _, fd, _ in files:
        os.close(fd)  # the holder has them
    with os.fdopen(r, "r") as report:
        answer = report.read()
    if answer.startswith("ok"):
        tokens = ", ".join(f"{token} ({spec})" for token, _, spec in files)
        print(f"holding session {args.name!r} in process {pid}: {len(files)} file(s), tokens {tokens}")
        print(f"it stays preserved until the kexec; `liveupdate release {args.name}` drops it")
        return 0
    os.waitpid(pid, 0)
    try:
        error = json.loads(answer)
    except ValueError:
        raise CommandError("the holder died before reporting", "run it again; if it persists, report a bug") from None
    raise CommandError(error["message"], error["hint"])


def _hold(args: argparse.Namespace, files: List[Tuple[int, int, str]], record: str, report_fd: int) -> int:
    try:
        with _open_device(args) as dev:
            session = dev.create_session(args.name)
            for token, fd, spec in files:
                try:
                    session.preserve(fd, token)
                except OSError as exc:
                    session.close()
                    raise fail(exc, f"{spec} could not be preserved") from None
    except (CommandError, OSError) as exc:
        error = exc if isinstance(exc, CommandError) else fail(exc)
        os.write(report_fd, json.dumps({"message": error.message, "hint": error.hint}).encode())
        return 1
    for _, fd, _ in files:
        os.close(fd)  # the session holds the files now
    service, service_boot = _service_boot(args) if session.backend == "service" else (None, None)
    try:
        hold_record.write(record, os.getpid(), args.name, [token for token, _, _ in files],
                          backend=session.backend, service=service, service_boot=service_boot)
    except OSError as exc:
        session.close()
        error = fail(exc, "the holder's record could not be written; check the state directory")
        os.write(report_fd, json.dumps({"message": error.message, "hint": error.hint}).encode())
        return 1
    stop = {"now": False}

    def _on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    os.write(report_fd, b"ok")
    os.close(report_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(devnull, std)
    while not stop["now"]:
        signal.pause()
    try:
        session.close()  # the kernel stops preserving the files
    finally:
        try:
            os.unlink(record)
        except FileNotFoundError:
            pass
    return 0


def _service_path(args: argparse.Namespace) -> Optional[str]:
    return args.emulator or os.environ.get("LIVEUPDATE_EMULATOR") or None


def _service_boot(args: argparse.Namespace) -> Tuple[Optional[str], Optional[int]]:
    """(socket, boot number) of the emulator service now, so that release
    can tell a session dropped from one handed over at an emulated kexec."""
    path = _service_path(args)
    if path is None:
        return None, None
    from ..service import client

    try:
        boot = client.status(path, timeout=args.timeout)["boot"]
    except (OSError, KeyError, TypeError):
        return path, None
    return path, boot if isinstance(boot, int) else None


def _remove(record: str) -> None:
    try:
        os.unlink(record)
    except FileNotFoundError:
        pass


def _holder_alive(record: str) -> Optional[Tuple[Dict[str, Any], hold_record.Holder]]:
    """The record and the running holder it names, or None (a stale record,
    whose process is gone, is removed). Raises CommandError for a record
    that is not one."""
    data = hold_record.read(record)
    if data is None:
        return None
    holder = hold_record.find(data)
    if holder is None:
        _remove(record)  # that process is gone (its pid may be another's now)
        return None
    return data, holder


def _fate(data: Dict[str, Any]) -> str:
    """What became of the files, as far as this process can tell."""
    count = f"its {len(data['tokens'])} file(s)"
    then, path = data.get("service_boot"), data.get("service")
    if isinstance(then, int) and isinstance(path, str):
        from ..service import client

        try:
            now = client.status(path, timeout=5.0).get("boot")
        except OSError:
            now = None
        if isinstance(now, int) and now != then:
            return (f"{count} were handed over at the emulated kexec (boot {then} -> {now}), so the holder "
                    f"held only a stale handle: retrieve the session in the new boot")
    return f"{count} are no longer preserved"


def run_release(args: argparse.Namespace) -> int:
    record = _record_path(state_dir(args.state_dir), args.name)
    found = _holder_alive(record)
    if found is None:
        raise CommandError(f"session {args.name!r} is not held here", "`liveupdate hold NAME FILE...` holds one")
    data, holder = found
    with holder:
        holder.terminate()
        stopped = holder.wait(STOP_TIMEOUT)
    if not stopped:
        raise CommandError(f"holder {holder.pid} of {args.name!r} did not stop within {STOP_TIMEOUT:g} s",
                           f"kill {holder.pid} stops it too")
    _remove(record)  # the holder removes it itself, unless it was killed meanwhile
    print(f"released session {args.name!r} (holder {holder.pid} stopped; {_fate(data)})")
    return 0
