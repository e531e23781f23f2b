"""The CLI under ``python -OO``, which strips every docstring: no command
may build its help (or anything else) from ``__doc__``."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List

from liveupdate.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _command_paths(parser: argparse.ArgumentParser, prefix: List[str]) -> List[List[str]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _command_paths(sub, prefix + [name])
    return found


def _run_oo(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-OO", "-m", "liveupdate", *argv], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO)


def test_version_under_OO():
    done = _run_oo("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("liveupdate ")


def test_every_command_help_under_OO():
    paths = _command_paths(build_parser(), [])
    assert ["hold"] in paths and ["kexec", "load"] in paths and ["emulator", "status"] in paths
    for path in paths:
        done = _run_oo(*path, "--help")
        assert done.returncode == 0, (path, done.stderr)
        assert "usage: liveupdate" in done.stdout, path
        assert "Traceback" not in done.stderr, (path, done.stderr)
        assert "``" not in done.stdout, (path, "reStructuredText markup in --help")


def test_commands_run_under_OO(tmp_path):
    done = _run_oo("status", "--json")
    assert done.returncode == 0, done.stderr
    done = _run_oo("kexec", "load", "--dry-run", "--append", "console=ttyS0", sys.executable)
    assert "Traceback" not in done.stderr, done.stderr
    done = _run_oo("emulator", "status", "--socket", str(tmp_path / "none.sock"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
