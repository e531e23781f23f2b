#!/usr/bin/env python3
"""A small key-value cache that keeps its data across a kernel live update.

The data lives in a memfd (not in Python objects), which the daemon
preserves in a Live Update session named after itself. After a kexec into
a kernel booted with ``liveupdate=on``, the next instance of the daemon
retrieves the session, takes the memfd back and serves the same data at
once, without rebuilding anything.

Three ways it can find its data when it starts, tried in this order:

1. systemd handed it fds (``LISTEN_FDS``): an *incoming* session (systemd
   v261 re-retrieved it after a kexec), or the *outgoing* session and the
   data memfd it stored before a plain restart;
2. the Live Update device has an incoming session of its name (a kexec
   without systemd, or the emulator service after ``liveupdate emulator
   kexec``);
3. nothing: a fresh, empty cache.

Usage::

    cache_daemon.py serve --socket /run/cache.sock        # the daemon
    cache_daemon.py set --socket /run/cache.sock KEY VALUE
    cache_daemon.py get --socket /run/cache.sock KEY
    cache_daemon.py stats --socket /run/cache.sock
    cache_daemon.py stop --socket /run/cache.sock

Where the machine has no ``/dev/liveupdate``, set ``LIVEUPDATE_EMULATOR`` to
an emulator service (``liveupdate emulator serve``) and emulate the kexec
with ``liveupdate emulator kexec``.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import struct
import sys
from typing import Dict, Optional, Tuple

import liveupdate
from liveupdate import systemd

#: The token under which the data memfd is preserved in the session.
DATA_TOKEN = 1
DEFAULT_NAME = "cache-daemon"
DEFAULT_CAPACITY = 1 << 20

# The memfd's layout: a magic, the length of the JSON that follows, the JSON.
MAGIC = b"LUCACHE1"
HEADER = struct.Struct("=8sQ")


class CacheFullError(Exception):
    pass


class MemfdStore:
    """A dict kept as JSON inside a fixed-size memfd.

    The size is fixed (and sealed) because a preserved memfd cannot grow or
    shrink: the kernel freezes its size while it is preserved."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.capacity = os.fstat(fd).st_size

    @classmethod
    def create(cls, capacity: int, name: str) -> "MemfdStore":
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, capacity)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        store = cls(fd)
        store.save({})
        return store

    def load(self) -> Dict[str, str]:
        magic, length = HEADER.unpack(os.pread(self.fd, HEADER.size, 0))
        if magic != MAGIC or HEADER.size + length > self.capacity:
            raise ValueError("the memfd does not hold a cache (wrong magic or length)")
        return json.loads(os.pread(self.fd, length, HEADER.size).decode("utf-8"))

    def save(self, data: Dict[str, str]) -> int:
        payload = json.dumps(data, sort_keys=True).encode("utf-8")
        if HEADER.size + len(payload) > self.capacity:
            raise CacheFullError(f"{len(payload)} bytes do not fit in {self.capacity - HEADER.size}")
        # Payload first, header last: a reader never sees a length that
        # points past what was written.
        os.pwrite(self.fd, payload, HEADER.size)
        os.pwrite(self.fd, HEADER.pack(MAGIC, len(payload)), 0)
        return len(payload)


def log(text: str) -> None:
    sys.stderr.write(f"cache-daemon[{os.getpid()}]: {text}\n")
    sys.stderr.flush()


def _from_systemd(name: str) -> Tuple[Optional[liveupdate.Session], Optional[int], Optional[int]]:
    """(session, data memfd if restarted, data memfd if retrieved after a
    kexec) from what systemd passed; all None when it passed nothing."""
    passed = {entry.name: entry.fd for entry in systemd.listen_fds()}
    sessions = systemd.find_sessions(unset_environment=True)
    session = sessions.pop(name, None)
    for other in sessions.values():
        other.detach()  # not ours to end
    stored_data = passed.get(f"{name}-data")
    if session is None:
        return None, stored_data, None
    try:
        retrieved = session.retrieve(DATA_TOKEN)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # EINVAL: an outgoing session, so this is a restart without a kexec;
        # the data is still in the memfd systemd kept for us.
        return session, stored_data, None
    # An incoming session: systemd took it back from the new kernel for us.
    session.finish()
    session.close()
    if stored_data is not None:
        os.close(stored_data)
    # The kernel frees the name only when every fd of the session is
    # closed, systemd's copy included; the barrier waits until it is.
    systemd.remove_fd(name)
    systemd.remove_fd(f"{name}-data")
    systemd.barrier()
    return None, None, retrieved


def recover(name: str, capacity: int) -> Tuple[MemfdStore, Optional[liveupdate.Session], str]:
    """Find the cache's data and its session; returns (store, the session
    still preserving it or None, how it was found)."""
    session, kept_fd, retrieved_fd = (None, None, None)
    if os.environ.get("LISTEN_FDS"):
        session, kept_fd, retrieved_fd = _from_systemd(name)
    if retrieved_fd is not None:
        return MemfdStore(retrieved_fd), None, "kexec (session from systemd)"
    if session is not None and kept_fd is not None:
        return MemfdStore(kept_fd), session, "restart (fds from systemd)"
    if session is not None:
        # A session without its memfd is of no use: end it so that the name
        # is free for a new one.
        session.close()
        systemd.remove_fd(name)
        systemd.barrier()
    with liveupdate.open(timeout=30, **OPEN_ARGS) as dev:
        try:
            incoming = dev.retrieve_session(name)
        except FileNotFoundError:
            return MemfdStore.create(capacity, name), None, "fresh start"
        fd = incoming.retrieve(DATA_TOKEN)
        incoming.finish()
        incoming.close()
    return MemfdStore(fd), None, "kexec (session from the device)"


#: Extra arguments of liveupdate.open(): the service to use, when asked for.
OPEN_ARGS: dict = {}


def preserve(store: MemfdStore, name: str) -> liveupdate.Session:
    """Put the data memfd in a new outgoing session, and hand both to
    systemd when it runs us with an fd store."""
    with liveupdate.open(timeout=30, **OPEN_ARGS) as dev:
        session = dev.create_session(name)
    session.preserve(store.fd, DATA_TOKEN)
    if systemd.notify_socket() is not None and os.environ.get("FDSTORE"):
        systemd.remove_fd(name)  # entries of an earlier instance, if any
        systemd.remove_fd(f"{name}-data")
        systemd.store_session(session, name)
        systemd.store_fd(store.fd, f"{name}-data")
        systemd.barrier()
    return session


class Server:
    def __init__(self, path: str, store: MemfdStore, session: liveupdate.Session, origin: str) -> None:
        self.path = path
        self.store = store
        self.session = session
        self.origin = origin
        self.data = store.load()
        self.running = True

    def handle(self, line: str) -> str:
        verb, _, rest = line.partition(" ")
        if verb == "GET":
            value = self.data.get(rest)
            return "MISSING" if value is None else f"OK {value}"
        if verb == "SET":
            key, _, value = rest.partition(" ")
            if not key:
                return "ERROR usage: SET KEY VALUE"
            candidate = dict(self.data)
            candidate[key] = value
            try:
                self.store.save(candidate)
            except CacheFullError as exc:
                return f"ERROR cache full: {exc}"
            self.data = candidate
            return "OK"
        if verb == "STATS":
            stats = {
                "keys": len(self.data),
                "origin": self.origin,
                "session": self.session.name,
                "backend": self.session.backend,
                "capacity": self.store.capacity,
            }
            return "OK " + json.dumps(stats, sort_keys=True)
        if verb == "STOP":
            self.running = False
            return "OK"
        return "ERROR unknown command (GET, SET, STATS, STOP)"

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener.bind(self.path)
        listener.listen(16)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        buffers: Dict[socket.socket, bytes] = {}
        print(f"serving {len(self.data)} keys on {self.path} ({self.origin})", flush=True)
        systemd.notify("READY=1")
        try:
            while self.running:
                for key, _ in selector.select():
                    if key.fileobj is listener:
                        conn, _ = listener.accept()
                        selector.register(conn, selectors.EVENT_READ)
                        buffers[conn] = b""
                        continue
                    conn = key.fileobj  # type: ignore[assignment]
                    chunk = conn.recv(65536)
                    if not chunk:
                        selector.unregister(conn)
                        conn.close()
                        del buffers[conn]
                        continue
                    buffers[conn] += chunk
                    while b"\n" in buffers[conn]:
                        raw, buffers[conn] = buffers[conn].split(b"\n", 1)
                        reply = self.handle(raw.decode("utf-8", "replace"))
                        conn.sendall(reply.encode("utf-8") + b"\n")
        finally:
            listener.close()
            os.unlink(self.path)


def serve(args: argparse.Namespace) -> int:
    # SIGTERM ends the loop like STOP, so that the socket file is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.emulator:
        OPEN_ARGS["emulator"] = args.emulator
    store, session, origin = recover(args.name, args.capacity)
    if session is None:
        session = preserve(store, args.name)
    log(f"{origin}: session {session.name!r} ({session.backend}) preserves the data memfd under token {DATA_TOKEN}")
    Server(args.socket, store, session, origin).serve()
    return 0


def request(path: str, line: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(line.encode("utf-8") + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode("utf-8").rstrip("\n")


def client(args: argparse.Namespace) -> int:
    line = {"get": lambda: f"GET {args.key}", "set": lambda: f"SET {args.key} {args.value}",
            "stats": lambda: "STATS", "stop": lambda: "STOP"}[args.command]()
    try:
        reply = request(args.socket, line)
    except OSError as exc:
        print(f"cache_daemon {args.command}: cannot reach the daemon at {args.socket}: {exc.strerror} "
              f"(hint: start it with: cache_daemon.py serve --socket {args.socket})", file=sys.stderr)
        return 1
    status, _, rest = reply.partition(" ")
    if status != "OK":
        print(reply, file=sys.stderr)
        return 1
    if rest:
        print(rest)
    return 0


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description="A cache that keeps its data across a kernel live update.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the daemon")
    run.add_argument("--name", default=DEFAULT_NAME, help="the Live Update session's name")
    run.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="bytes of the data memfd")
    run.add_argument("--emulator", metavar="SOCKET",
                     help="use the emulator service at SOCKET even where /dev/liveupdate exists")
    for name in ("get", "set", "stats", "stop"):
        sub = commands.add_parser(name)
        if name in ("get", "set"):
            sub.add_argument("key")
        if name == "set":
            sub.add_argument("value")
    for sub in commands.choices.values():
        sub.add_argument("--socket", required=True, help="the daemon's unix socket")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            return serve(args)
        except OSError as exc:
            log(f"cannot start: {exc}")
            return 1
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
