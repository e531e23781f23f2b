"""``serve --ready-fd``: a fd that cannot take READY fails the start before
"serving at" is printed, and no socket file is left behind."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import WAIT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _serve(socket_path, ready_fd: str, pass_fds=()):
    return subprocess.run([sys.executable, "-m", "liveupdate", "emulator", "serve", "--socket", str(socket_path),
                           "--ready-fd", ready_fd], capture_output=True, text=True, timeout=WAIT,
                          pass_fds=pass_fds, env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.parametrize("fd", ["99", "-1", "99999999999999999999"])
def test_a_closed_ready_fd_fails_first_and_leaves_no_socket(tmp_path, fd):
    sock = tmp_path / "emulator.sock"
    done = _serve(sock, fd)
    assert done.returncode == 1, done.stderr
    assert "serving at" not in done.stderr + done.stdout
    assert f"--ready-fd {fd} is not an open fd" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not sock.exists()


def test_a_read_only_ready_fd_is_refused_too(tmp_path):
    sock = tmp_path / "emulator.sock"
    r, w = os.pipe()
    try:
        done = _serve(sock, str(r), pass_fds=(r,))
    finally:
        os.close(r)
        os.close(w)
    assert done.returncode == 1, done.stderr
    assert "serving at" not in done.stderr and "read-only" in done.stderr
    assert not sock.exists()


def test_a_ready_fd_whose_reader_is_gone_leaves_no_socket(tmp_path):
    sock = tmp_path / "emulator.sock"
    r, w = os.pipe()
    os.close(r)  # writing READY gets EPIPE
    try:
        done = _serve(sock, str(w), pass_fds=(w,))
    finally:
        os.close(w)
    assert done.returncode == 1, done.stderr
    assert "serving at" not in done.stderr and "cannot write READY" in done.stderr
    assert not sock.exists()
