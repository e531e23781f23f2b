"""``hold NAME -1=FILE``: a word that starts with '-' and a digit is a
TOKEN=FILE argument (refused for its token), not an unknown option."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hold(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liveupdate", "hold", *argv], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)


@pytest.mark.parametrize("argv", [["x", "-1=FILE"], ["x", "--copy", "-1=FILE"], ["--emulator=/nonexistent", "x",
                                                                                  "-1=/dev/null"]])
def test_a_negative_token_is_read_as_a_token(tmp_path, argv):
    done = _hold("--state-dir", str(tmp_path), *argv)
    assert done.returncode == 2, done.stderr
    assert "unrecognized arguments" not in done.stderr
    assert "token -1 is out of range" in done.stderr


def test_real_options_are_still_options(tmp_path):
    done = _hold("--state-dir", str(tmp_path), "--bogus", "x", "0=/dev/null")
    assert done.returncode == 2
    assert "unrecognized arguments: --bogus" in done.stderr
