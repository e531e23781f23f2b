#!/usr/bin/env python3
"""A small key-value cache that keeps its data across a kernel live update.

The data lives in a memfd (not in Python objects), which survives a kexec
into a kernel booted with ``liveupdate=on``; the next instance of the daemon
takes the memfd back and serves the same data at once, without rebuilding
anything. Two ways, chosen by how it runs:

under systemd with an fd store (the shipped ``cache-daemon.service``)
    the daemon pushes the memfd into its fd store (``FDSTORE=1``) and that
    is all: systemd (v261 or later, ``FileDescriptorStorePreserve=yes``)
    hands it back after a plain restart, and across ``systemctl kexec``
    preserves it in its own Live Update session and hands it back in the
    next kernel, kexec after kexec;
anywhere else
    the daemon preserves the memfd in a Live Update session named after
    itself and keeps the session open; after a kexec it retrieves the
    session (from ``/dev/liveupdate``, or from the emulator service after
    ``liveupdate emulator kexec``), takes the memfd back and preserves it
    in a new session for the next kexec.

With neither, it starts with a fresh, empty cache.

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


def _fd_store() -> bool:
    """Whether systemd runs us with an fd store to keep the memfd in."""
    size = os.environ.get("FDSTORE", "")
    return systemd.notify_socket() is not None and size.isascii() and size.isdigit() and int(size) > 0


def recover(name: str, capacity: int) -> Tuple[MemfdStore, Optional[liveupdate.Session], str]:
    """Find the cache's data; returns (store, the session preserving it or
    None, how it was found)."""
    if _fd_store():
        passed = {entry.name: entry.fd for entry in systemd.listen_fds(unset_environment=True)}
        fd = passed.pop(f"{name}-data", None)
        if fd is not None:
            return MemfdStore(fd), None, "systemd's fd store"
        store = MemfdStore.create(capacity, name)
        systemd.store_fd(store.fd, f"{name}-data")
        systemd.barrier()
        return store, None, "fresh start"
    with liveupdate.open(timeout=30, **OPEN_ARGS) as dev:
        try:
            incoming = dev.retrieve_session(name)
        except FileNotFoundError:
            store, origin = MemfdStore.create(capacity, name), "fresh start"
        else:
            # The kernel will not hand this session over again: take the
            # memfd out, finish the session, and preserve the memfd anew.
            fd = incoming.retrieve(DATA_TOKEN)
            incoming.finish()
            incoming.close()
            store, origin = MemfdStore(fd), "kexec (session from the device)"
        session = dev.create_session(name)
    session.preserve(store.fd, DATA_TOKEN)
    return store, session, origin


#: Extra arguments of liveupdate.open(): the service to use, when asked for.
OPEN_ARGS: dict = {}


class Server:
    def __init__(self, path: str, store: MemfdStore, session: Optional[liveupdate.Session], origin: str) -> None:
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
                "session": self.session.name if self.session else None,
                "backend": self.session.backend if self.session else "systemd",
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
        log(f"{origin}: the data memfd is in systemd's fd store as {args.name}-data")
    else:
        log(f"{origin}: session {session.name!r} ({session.backend}) preserves the data memfd "
            f"under token {DATA_TOKEN}")
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
