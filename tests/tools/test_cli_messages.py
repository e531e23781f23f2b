"""Messages that misled (issue 13, item 6), each as the user sees it now."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from liveupdate.cli._common import fail

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*argv: str, env=None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "LIVEUPDATE_EMULATOR")}
    full.update(PYTHONPATH=REPO, **(env or {}))
    return subprocess.run([sys.executable, "-m", "liveupdate", *argv], capture_output=True, text=True, timeout=60,
                          env=full, cwd=REPO)


def test_emfile_has_a_hint():
    line = fail(OSError(errno.EMFILE, os.strerror(errno.EMFILE))).line("liveupdate hold")
    assert "(hint: " in line and "ulimit -n" in line


@pytest.mark.parametrize("action", ["serve", "status", "kexec"])
def test_without_xdg_runtime_dir_the_advice_comes_once(action):
    done = cli("emulator", action)
    assert done.returncode == 1
    assert done.stderr.count("XDG_RUNTIME_DIR") == 1, done.stderr
    assert "--socket PATH" in done.stderr


def test_inspect_of_a_directory_has_a_hint(tmp_path):
    done = cli("inspect", str(tmp_path))
    assert done.returncode == 1
    assert "(EISDIR)" in done.stderr and "(hint: " in done.stderr


@pytest.mark.parametrize("argv, says", [
    (["release"], "the session name given to `liveupdate hold`"),
    (["emulator", "status"], "how long to wait for the service's answer"),
    (["emulator", "kexec"], "inf waits for ever"),
    (["kexec", "load"], "the command line under 2048 bytes"),
    (["kexec", "exec"], "Sync the file systems and jump"),
    (["kexec", "unload"], "Forget the kernel loaded for kexec"),
])
def test_help_describes_each_command(argv, says):
    done = cli(*argv, "--help")
    assert done.returncode == 0
    assert says in " ".join(done.stdout.split()), done.stdout


def test_the_vm_readme_holds_no_draft():
    with open(os.path.join(REPO, "tools", "vm", "README.md"), encoding="utf-8") as src:
        text = src.read()
    assert "(Section for the README.)" not in text
