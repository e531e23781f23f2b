"""The client trusts only a listener of its own uid or root (SO_PEERCRED),
and ``serve`` names the uid of whoever occupies its socket path: another
user who binds the path first in a shared directory gets nothing."""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import liveupdate
from liveupdate.service import client, paths

from .conftest import WAIT

NEEDS_EMULATOR = False
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running a listener of another uid needs root")

def _nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def _squat(path: str, report: int) -> None:
    """The other user's side (a forked child, no exec: this interpreter
    may live where nobody cannot read): listen at ``path``, report the size
    of whatever each client sends."""
    os.setgid(_nobody())
    os.setuid(_nobody())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    os.chmod(path, 0o777)
    sock.listen(8)
    os.write(report, b"READY\n")
    sock.settimeout(WAIT)
    while True:
        conn, _ = sock.accept()
        conn.settimeout(1)
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        os.write(report, b"%d bytes\n" % len(data))
        conn.close()


@pytest.fixture
def squatter():
    """A socket at a path in a shared sticky directory, bound by uid nobody;
    yields the path and a function that returns what it received so far."""
    directory = tempfile.mkdtemp(prefix="luo-squat-")
    os.chmod(directory, 0o1777)
    path = os.path.join(directory, "liveupdate-emulator.sock")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _squat(path, w)
        finally:
            os._exit(0)
    os.close(w)
    os.set_blocking(r, False)

    def received() -> str:
        try:
            return os.read(r, 65536).decode()
        except BlockingIOError:
            return ""

    try:
        deadline = time.monotonic() + WAIT
        seen = ""
        while "READY" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
            seen += received()
        assert "READY" in seen
        yield path, received
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_client_refuses_a_listener_of_another_uid(squatter):
    path, received = squatter
    with pytest.raises(OSError) as info:
        liveupdate.open(emulator=path)
    assert info.value.errno == errno.EACCES
    assert f"uid {_nobody()}" in str(info.value)
    # Nothing was sent: the squatter read 0 bytes of the connection.
    deadline = time.monotonic() + WAIT
    seen = ""
    while "bytes" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
        seen += received()
    assert seen.split() == ["0", "bytes"]


def test_control_calls_refuse_it_too(squatter):
    path, _ = squatter
    for call in (client.status, client.kexec):
        with pytest.raises(OSError) as info:
            call(path, timeout=WAIT)
        assert info.value.errno == errno.EACCES
        assert f"uid {_nobody()}" in str(info.value)


def test_serve_names_the_uid_that_occupies_its_path(squatter):
    path, _ = squatter
    with pytest.raises(OSError) as info:
        paths.bind_listener(path)
    assert info.value.errno == errno.EADDRINUSE
    assert f"uid {_nobody()} (another user" in str(info.value)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "liveupdate", "emulator", "serve", "--socket", path],
                          capture_output=True, text=True, timeout=WAIT, env=dict(os.environ, PYTHONPATH=repo))
    assert done.returncode == 1
    assert f"uid {_nobody()}" in done.stderr and "Traceback" not in done.stderr


def test_the_own_uid_and_root_are_trusted(service):
    assert client.status(service.socket, timeout=WAIT)["pid"] == service.pid
