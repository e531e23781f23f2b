"""The example cache daemon keeps its data across a kexec.

Real processes throughout: the daemon runs as ``python examples/cache_daemon/
cache_daemon.py serve``. On any machine the kexec is the emulator service's;
in the VM tier (``LIVEUPDATE_STAGE``) it is a real one, and the two halves of
``test_real_kexec_round_trip`` run in the kernels before and after it:

    tools/vmtest --kexec -- python3 -m pytest tests/tools/test_example_daemon.py -k real
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

import liveupdate

REPO = Path(__file__).resolve().parents[2]
DAEMON = REPO / "examples" / "cache_daemon" / "cache_daemon.py"
NAME = "cache-daemon"

# What systemd does between fork and exec: the fds go to 3, 4, ... and the
# LISTEN_* variables describe them, LISTEN_PID being the pid that execs.
LAUNCHER = r"""
import fcntl, os, sys
sources = [int(fd) for fd in os.environ.pop("TEST_FD_SOURCES").split(",") if fd]
names = os.environ.pop("TEST_FD_NAMES")
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for offset, fd in enumerate(parked):
    os.dup2(fd, 3 + offset, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(sources)), LISTEN_FDNAMES=names)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def daemon_env(**extra: str) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LISTEN_", "NOTIFY_SOCKET", "FDSTORE"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Daemon:
    """One instance of the example daemon, started and waited for."""

    def __init__(self, sock: str, env: Dict[str, str], fds: Optional[List[Tuple[str, int]]] = None) -> None:
        self.sock = sock
        argv = [str(DAEMON), "serve", "--socket", sock]
        if env.get("LIVEUPDATE_EMULATOR"):
            # Explicitly: where /dev/liveupdate exists (the VM tier) the
            # device would win over $LIVEUPDATE_EMULATOR.
            argv += ["--emulator", env["LIVEUPDATE_EMULATOR"]]
        if fds is None:
            command, pass_fds = [sys.executable] + argv, ()
        else:
            env = dict(env, TEST_FD_SOURCES=",".join(str(fd) for _, fd in fds),
                       TEST_FD_NAMES=":".join(name for name, _ in fds))
            command, pass_fds = [sys.executable, "-c", LAUNCHER] + argv, tuple(fd for _, fd in fds)
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, pass_fds=pass_fds)
        # The daemon prints one line once it serves: no sleeping, no polling.
        self.banner = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not self.banner:
            self.proc.wait(60)
            raise AssertionError(f"the daemon did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def ask(self, *words: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.sock)
            conn.sendall((" ".join(words) + "\n").encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.decode().rstrip("\n")

    def stats(self) -> Dict[str, object]:
        reply = self.ask("STATS")
        assert reply.startswith("OK "), reply
        return json.loads(reply[3:])

    def stop(self) -> str:
        assert self.ask("STOP") == "OK"
        self.proc.wait(60)
        assert self.proc.returncode == 0
        return self.proc.stderr.read()  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


@pytest.fixture
def service(tmp_path) -> Iterator[str]:
    try:
        from liveupdate.service.testing import running_service
    except ImportError as exc:
        pytest.skip(f"the emulator service is not available here: {exc}")
    directory = tmp_path / "service"
    directory.mkdir()
    with running_service(directory) as path:
        yield path


def emulated_kexec(service: str) -> None:
    from liveupdate.service import client

    client.kexec(service)


# -- without systemd: the session comes back from the device ------------------


def test_round_trip_through_emulated_kexecs(service: str, tmp_path) -> None:
    env = daemon_env(LIVEUPDATE_EMULATOR=service)
    sock = str(tmp_path / "cache.sock")
    first = Daemon(sock, env)
    try:
        assert first.banner == f"serving 0 keys on {sock} (fresh start)"
        assert first.ask("SET", "greeting", "hello across a kexec") == "OK"
        assert first.ask("SET", "answer", "42") == "OK"
        assert first.ask("GET", "greeting") == "OK hello across a kexec"
        assert first.stats()["origin"] == "fresh start"
        emulated_kexec(service)
        first.stop()  # a real kexec ends it; the emulated one leaves it stale
    finally:
        first.kill()

    second = Daemon(sock, env)
    try:
        assert second.banner == f"serving 2 keys on {sock} (kexec (session from the device))"
        assert second.ask("GET", "greeting") == "OK hello across a kexec"
        assert second.ask("GET", "answer") == "OK 42"
        assert second.ask("GET", "nothing") == "MISSING"
        assert second.ask("SET", "after", "the first kexec") == "OK"
        emulated_kexec(service)
        second.stop()
    finally:
        second.kill()

    third = Daemon(sock, env)
    try:
        assert third.banner.startswith("serving 3 keys")
        assert third.ask("GET", "after") == "OK the first kexec"
        stats = third.stats()
        assert stats == {"backend": "service", "capacity": 1 << 20, "keys": 3,
                         "origin": "kexec (session from the device)", "session": NAME}
    finally:
        third.stop()
        third.kill()


def test_without_a_kexec_the_data_is_gone(service: str, tmp_path) -> None:
    # Stopping the daemon closes its session: nothing is preserved any more.
    env = daemon_env(LIVEUPDATE_EMULATOR=service)
    sock = str(tmp_path / "cache.sock")
    first = Daemon(sock, env)
    try:
        assert first.ask("SET", "k", "v") == "OK"
        first.stop()
    finally:
        first.kill()
    emulated_kexec(service)
    second = Daemon(sock, env)
    try:
        assert "fresh start" in second.banner
        assert second.ask("GET", "k") == "MISSING"
    finally:
        second.stop()
        second.kill()


# -- under a fake systemd with an fd store --------------------------------------


class FakeSystemd:
    """The notify socket and fd store of one service, as systemd keeps them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.store: Dict[str, int] = {}
        self.log: List[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def env(self) -> Dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": "8"}

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                data, fds = self._receive()
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            with self.lock:
                self.log.append(data)
                if fields.get("FDSTORE") == "1":
                    for fd in fds:
                        self._drop(fields["FDNAME"])
                        self.store[fields["FDNAME"]] = fd
                    continue
                if fields.get("FDSTOREREMOVE") == "1":
                    self._drop(fields["FDNAME"])
                for fd in fds:  # BARRIER=1: closing its fd is the answer
                    os.close(fd)

    def _receive(self) -> Tuple[str, List[int]]:
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 8))
        fds: List[int] = []
        for _, _, payload in ancdata:
            fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                       for i in range(0, len(payload) - len(payload) % 4, 4))
        return data.decode(), fds

    def _drop(self, name: str) -> None:
        fd = self.store.pop(name, None)
        if fd is not None:
            os.close(fd)

    def stored(self) -> Dict[str, int]:
        with self.lock:
            return dict(self.store)

    def replace(self, name: str, fd: int) -> None:
        with self.lock:
            self._drop(name)
            self.store[name] = fd

    def close(self) -> None:
        self.done.set()
        self.thread.join(30)
        for name in list(self.store):
            self._drop(name)
        self.sock.close()


def test_restart_and_kexec_under_systemd(service: str, tmp_path) -> None:
    fake = FakeSystemd(str(tmp_path / "notify"))
    env = daemon_env(LIVEUPDATE_EMULATOR=service, **fake.env())
    sock = str(tmp_path / "cache.sock")
    try:
        first = Daemon(sock, env)
        try:
            assert "fresh start" in first.banner
            assert first.ask("SET", "greeting", "kept by systemd") == "OK"
            assert first.stats()["backend"] == "systemd"
            first.stop()
        finally:
            first.kill()
        # Under systemd the memfd alone goes into the fd store: systemd
        # itself carries it through a kexec (the systemd tier shows it).
        store = fake.stored()
        assert sorted(store) == [f"{NAME}-data"]

        # A restart (or the start after a kexec): systemd passes it back.
        second = Daemon(sock, env, fds=[(f"{NAME}-data", store[f"{NAME}-data"])])
        try:
            assert second.banner == f"serving 1 keys on {sock} (systemd's fd store)"
            assert second.ask("GET", "greeting") == "OK kept by systemd"
            second.stop()
        finally:
            second.kill()
        assert sorted(fake.stored()) == [f"{NAME}-data"]  # nothing stored twice
        assert not any("FDSTOREREMOVE" in entry for entry in fake.log)
    finally:
        fake.close()


# -- the real thing, in the VM tier -------------------------------------------------


def test_real_kexec_round_trip() -> None:
    stage = os.environ.get("LIVEUPDATE_STAGE")
    out = os.environ.get("LIVEUPDATE_VM_OUT")
    if not stage or not out or not os.path.exists(liveupdate.DEFAULT_PATH):
        pytest.skip("runs in the VM tier across a real kexec: "
                    "tools/vmtest --kexec -- python3 -m pytest tests/tools/test_example_daemon.py -k real")
    sock = os.path.join(os.environ.get("TMPDIR", "/tmp"), "cache-daemon.sock")
    env = daemon_env()
    expected = {"greeting": "hello from the kernel before", "stage": "1"}
    record = os.path.join(out, "cache-daemon.json")
    if stage == "1":
        if os.environ.get("LIVEUPDATE_VM_KEXEC") != "1":
            pytest.skip("stage 1 of a round trip only (run with --kexec)")
        daemon = Daemon(sock, env)
        assert "fresh start" in daemon.banner
        for key, value in expected.items():
            assert daemon.ask("SET", key, value) == "OK"
        # Left running: it holds the session through the kexec that follows.
        with open(record, "w") as f:
            json.dump({"pid": daemon.proc.pid, "data": expected}, f)
        return
    with open(record) as f:
        before = json.load(f)
    daemon = Daemon(sock, env)
    try:
        assert daemon.banner == f"serving 2 keys on {sock} (kexec (session from the device))"
        for key, value in before["data"].items():
            assert daemon.ask("GET", key) == f"OK {value}"
        assert daemon.stats()["backend"] == "device"
    finally:
        daemon.stop()
        daemon.kill()
