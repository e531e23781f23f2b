"""The other processes of the service tests: run as ``python actors.py ROLE ...``.

Each role talks to the service named by its first argument through the
public API only, reports on stdout (one JSON line) and exits 0; on any
unexpected error it prints the traceback and exits 1. Roles that must stay
alive (to hold a session through a kexec) wait for stdin to close, so the
test decides when they go and a lost test cannot leave them behind.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from typing import Any, Dict, List

import liveupdate


def content(name: str, token: int) -> bytes:
    return f"{name}:{token}:".encode() * (1 + token % 7)


def report(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def wait_for_stdin_eof() -> None:
    while sys.stdin.buffer.read(4096):
        pass


def make_memfd(data: bytes) -> int:
    fd = os.memfd_create("actor")
    os.write(fd, data)
    return fd


def daemon(sock: str, name: str, count: str) -> None:
    """Create session NAME with COUNT memfds, report, hold it until stdin closes."""
    with liveupdate.open(emulator=sock, timeout=60) as dev:
        session = dev.create_session(name)
    for token in range(int(count)):
        fd = make_memfd(content(name, token))
        session.preserve(fd, token)
        os.close(fd)
    report(ready=True, pid=os.getpid(), fd=session.fileno())
    wait_for_stdin_eof()
    session.close()


def hold_device(sock: str) -> None:
    """Hold the device until killed or stdin closes."""
    dev = liveupdate.open(emulator=sock, timeout=60)
    report(ready=True, pid=os.getpid())
    wait_for_stdin_eof()
    dev.close()


def retrieve(sock: str, name: str, count: str) -> None:
    """Retrieve session NAME and its COUNT files; report their contents."""
    with liveupdate.open(emulator=sock, timeout=60) as dev:
        session = dev.retrieve_session(name)
    found: Dict[str, str] = {}
    for token in range(int(count)):
        fd = session.retrieve(token)
        found[str(token)] = os.pread(fd, 1 << 16, 0).decode()
        os.close(fd)
    session.finish()
    session.close()
    report(name=name, files=found)


def adopt(fd_text: str) -> None:
    """Adopt an inherited session fd with Session.from_fd and report its name."""
    session = liveupdate.Session.from_fd(int(fd_text))
    report(name=session.name, backend=session.backend)
    session.close()


def worker(sock: str, index: str, ops_text: str) -> None:
    """Do OPS operations of every kind; keep one session per round open
    with known files; report them, then hold them until stdin closes."""
    me, wanted = int(index), int(ops_text)
    ops = 0
    kept: List[Any] = []
    kept_names: List[str] = []
    unexpected: List[str] = []

    def expect(code: int, func: Any, *args: Any) -> None:
        try:
            func(*args)
        except OSError as exc:
            if exc.errno != code:
                unexpected.append(f"{func.__name__}{args}: {exc}")
            return
        unexpected.append(f"{func.__name__}{args}: succeeded, expected {errno.errorcode[code]}")

    rnd = 0
    while ops < wanted:
        with liveupdate.open(emulator=sock, timeout=120) as dev:
            sessions = [dev.create_session(f"w{me}-r{rnd}-s{k}") for k in range(3)]
            ops += 4
            expect(errno.EEXIST, dev.create_session, f"w{me}-r{rnd}-s0")
            expect(errno.ENOENT, dev.retrieve_session, f"w{me}-r{rnd}-nothing")
            ops += 2
        ops += 1
        for k, session in enumerate(sessions):
            for token in range(8):
                fd = make_memfd(content(session.name, token))
                session.preserve(fd, token)
                if token == 0:
                    expect(errno.EEXIST, session.preserve, fd, token)
                os.close(fd)
                ops += 2
            if session.name != f"w{me}-r{rnd}-s{k}":
                unexpected.append(f"name {session.name!r}")
            expect(errno.EINVAL, session.retrieve, 0)
            expect(errno.EINVAL, session.finish)
            ops += 4
            if k == 0:
                kept.append(session)
                kept_names.append(session.name)
            else:
                session.close()
                ops += 1
        rnd += 1
    report(ops=ops, kept=kept_names, unexpected=unexpected)
    wait_for_stdin_eof()
    for session in kept:
        session.close()


def other_uid(sock: str, uid_text: str) -> None:
    """Become UID, then try to open the service's device; report the errno."""
    uid = int(uid_text)
    # Everything is imported while still root: the other uid may not be
    # able to read this interpreter's files.
    import liveupdate.service.client  # noqa: F401

    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        liveupdate.open(emulator=sock).close()
    except OSError as exc:
        report(errno=exc.errno, message=str(exc))
        return
    report(errno=0)


def store_and_exit(sock: str, name: str) -> None:
    """Create session NAME with file 0, push it into the fd store named by
    $NOTIFY_SOCKET (as a systemd service does) and exit."""
    from liveupdate import systemd

    with liveupdate.open(emulator=sock, timeout=60) as dev:
        session = dev.create_session(name)
    fd = make_memfd(content(name, 0))
    session.preserve(fd, 0)
    os.close(fd)
    stored = systemd.store_session(session)
    report(stored=stored)
    session.close()  # the store holds the session now


def restarted(sock: str) -> None:
    """Started with the fd store handed back (LISTEN_FDS): adopt the
    session, preserve file 1 in it, hold it until stdin closes."""
    from liveupdate import systemd

    sessions = systemd.find_sessions()
    names = sorted(sessions)
    for name, session in sessions.items():
        fd = make_memfd(content(name, 1))
        session.preserve(fd, 1)
        os.close(fd)
    report(sessions=names, backends=sorted({s.backend for s in sessions.values()}))
    wait_for_stdin_eof()
    for session in sessions.values():
        session.close()


ROLES = {"daemon": daemon, "hold-device": hold_device, "retrieve": retrieve, "adopt": adopt,
         "worker": worker, "other-uid": other_uid, "store-and-exit": store_and_exit, "restarted": restarted}

if __name__ == "__main__":
    try:
        ROLES[sys.argv[1]](*sys.argv[2:])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
