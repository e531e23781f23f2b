"""Image paths that are not regular files (issue 12 item 4): /dev/zero, a
FIFO, a directory. Each is refused at once, in one line, by inspect,
Emulator.from_image and serve --image; none may block or read without end.
Every case runs in a child process with a timeout, so that a regression
(a blocking open of a FIFO, an endless read of /dev/zero) fails the test
instead of hanging the suite."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _path(kind: str, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if kind == "dev-zero":
        return "/dev/zero"
    if kind == "fifo":
        path = str(tmp_path / "image.fifo")
        os.mkfifo(path)
        return path
    path = str(tmp_path / "image.dir")
    os.mkdir(path)
    return path


def _run(args, timeout=30):  # type: ignore[no-untyped-def]
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


KINDS = ["dev-zero", "fifo", "directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_refuses_in_one_line(kind, tmp_path):  # type: ignore[no-untyped-def]
    proc = _run(["-m", "liveupdate", "inspect", _path(kind, tmp_path)])
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert ("not a regular file" in proc.stderr) or ("directory" in proc.stderr)
    assert proc.stdout == ""


@pytest.mark.parametrize("kind", KINDS)
def test_from_image_refuses_with_an_errno(kind, tmp_path):  # type: ignore[no-untyped-def]
    code = textwrap.dedent(f"""
        import liveupdate
        try:
            liveupdate.Emulator.from_image({_path(kind, tmp_path)!r})
        except OSError as exc:
            print(exc.errno)
    """)
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    expected = errno.EISDIR if kind == "directory" else errno.ENOEXEC
    assert proc.stdout.strip() == str(expected)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_serve_refuses_an_image_that_is_not_a_regular_file(kind, tmp_path):  # type: ignore[no-untyped-def]
    proc = _run(["-m", "liveupdate", "emulator", "serve", "--socket", str(tmp_path / "sock"),
                 "--image", _path(kind, tmp_path)])
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "not a regular file" in last or "directory" in last, proc.stderr
    assert not os.path.exists(tmp_path / "sock")
