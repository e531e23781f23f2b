"""A service in a temporary directory, for tests (this project's and yours).

    from liveupdate.service.testing import running_service

    with running_service(tmp_path) as socket_path:
        dev = liveupdate.open(emulator=socket_path)

:class:`ServiceProcess` gives more control: kill it, restart it on the same
image, kexec it. Every wait here is bounded.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import liveupdate

from . import client

__all__ = ["ServiceProcess", "running_service", "START_TIMEOUT", "STOP_TIMEOUT"]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _package_root() -> str:
    # The directory that holds the liveupdate package, so that the service
    # process imports the same code as the test, installed or not.
    return os.path.dirname(os.path.dirname(os.path.abspath(liveupdate.__file__)))


class ServiceProcess:
    """``python -m liveupdate.service serve`` in a child process.

    ``directory`` holds the socket (``emulator.sock``) and, with
    ``image=True``, the image (``emulator.img``); ``image`` may also be a
    path. ``env`` adds environment variables (fault injection, for instance)."""

    def __init__(self, directory: Any, image: Any = False, env: Optional[Dict[str, str]] = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.directory = os.fspath(directory)
        self.socket = os.path.join(self.directory, "emulator.sock")
        if image is True:
            image = os.path.join(self.directory, "emulator.img")
        self.image: Optional[str] = os.fspath(image) if image else None
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.proc: "Optional[subprocess.Popen[bytes]]" = None
        self.log_path = os.path.join(self.directory, "emulator.log")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self) -> List[str]:
        argv = [sys.executable, "-m", "liveupdate.service", "serve", "--socket", self.socket]
        if self.image:
            argv += ["--image", self.image]
        return argv + self.extra_args

    def start(self, timeout: float = START_TIMEOUT) -> "ServiceProcess":
        """Start it and wait until it accepts connections.

        Raises RuntimeError (with the service's log) if it exits or is not
        ready within ``timeout`` seconds."""
        env = dict(os.environ)
        env.pop("LIVEUPDATE_SERVICE_FAULT", None)
        env.update(self.env)
        env["PYTHONPATH"] = _package_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        ready_r, ready_w = os.pipe()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command() + ["--ready-fd", str(ready_w)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(ready_w,))
        finally:
            os.close(ready_w)
            log.close()
        try:
            self._await_ready(ready_r, timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(ready_r)
        return self

    def _await_ready(self, ready_r: int, timeout: float) -> None:
        import select

        poller = select.poll()
        poller.register(ready_r, select.POLLIN)
        assert self.proc is not None
        if poller.poll(timeout * 1000):
            if os.read(ready_r, 16).startswith(b"READY"):
                return
            # EOF: the service closed the pipe without a word, i.e. it exited.
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        why = f"exited with {code}" if code is not None else f"not ready after {timeout:g} s"
        raise RuntimeError(f"emulator service {why}; its log:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``;
        returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def is_stopped(self) -> bool:
        """True when the process is stopped by a signal (fault injection)."""
        try:
            with open(f"/proc/{self.pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] == "T"
        except OSError:
            return False

    def wait_stopped(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the process has stopped itself; RuntimeError if not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_stopped():
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"the emulator service did not stop itself; its log:\n{self.log()}")

    def kexec(self, timeout: float = START_TIMEOUT) -> Dict[str, Any]:
        return client.kexec(self.socket, timeout)

    def status(self, timeout: float = START_TIMEOUT) -> Dict[str, Any]:
        return client.status(self.socket, timeout)

    def open(self, **kwargs: Any) -> "liveupdate.Device":
        return liveupdate.open(backend="service", emulator=self.socket, **kwargs)

    def __enter__(self) -> "ServiceProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


@contextlib.contextmanager
def running_service(directory: Any, image: Any = False, env: Optional[Dict[str, str]] = None) -> Iterator[str]:
    """Start a service in ``directory`` and yield its socket path; stop it
    on exit. See :class:`ServiceProcess` for the arguments."""
    with ServiceProcess(directory, image=image, env=env) as service:
        yield service.socket
