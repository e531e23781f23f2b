"""Fixtures of the emulator service tests: a service per test, and the
other processes (actors.py) that use it. Every wait is bounded."""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from liveupdate.service import testing

ACTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "actors.py")
#: Bound on any single wait for another process in these tests.
WAIT = 60.0


def _emulator_available() -> Optional[str]:
    try:
        importlib.import_module("liveupdate.emulator").Emulator
    except (ImportError, AttributeError) as exc:
        return str(exc)
    return None


@pytest.fixture(autouse=True)
def _needs_emulator(request) -> None:
    if not getattr(request.module, "NEEDS_EMULATOR", True):
        return
    missing = _emulator_available()
    if missing:
        pytest.skip(f"the emulator service runs liveupdate.emulator, not importable here: {missing}")


class Actor:
    """A process running a role of actors.py; its stdout is JSON lines."""

    def __init__(self, sock: str, role: str, *args: Any, pass_fds: tuple = (),
                 preexec_fn: Optional[Callable[[], None]] = None, prefix: tuple = (),
                 env: Optional[Dict[str, str]] = None) -> None:
        self.role = role
        full = dict(os.environ)
        full.update(env or {})
        full["PYTHONPATH"] = testing._package_root() + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([*prefix, sys.executable, ACTORS, role, sock, *map(str, args)], env=full,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     pass_fds=pass_fds, preexec_fn=preexec_fn)
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float = WAIT) -> Dict[str, Any]:
        """The next JSON line; AssertionError with stderr if none comes in time."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(remaining, 0))
            if not ready:
                self.kill()
                raise AssertionError(f"actor {self.role} said nothing in {timeout:g} s: {self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait(WAIT)
                raise AssertionError(f"actor {self.role} exited {code} without a report: {self.stderr()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def finish(self, timeout: float = WAIT) -> int:
        """Close its stdin (the signal to let go) and wait for its exit code."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"actor {self.role} did not exit in {timeout:g} s")

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def service(tmp_path) -> Iterator[testing.ServiceProcess]:
    """A running service (no image) in this test's directory, stopped after."""
    svc = testing.ServiceProcess(tmp_path)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def actors() -> Iterator[Callable[..., Actor]]:
    """Factory ``actors(sock, role, *args) -> Actor``; all killed at teardown."""
    made: List[Actor] = []

    def start(sock: str, role: str, *args: Any, **kwargs: Any) -> Actor:
        actor = Actor(sock, role, *args, **kwargs)
        made.append(actor)
        return actor

    yield start
    for actor in made:
        actor.close()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def wait_child(pid: int, timeout: float = WAIT) -> int:
    """Exit code of forked child ``pid``; SIGKILL and AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} still running after {timeout:g} s")
        time.sleep(0.01)
