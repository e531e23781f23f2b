"""``liveupdate emulator systemd``: what it refuses before it starts
anything, each in one line with a hint. The whole flow (units started,
``liveupdate emulator kexec`` doing systemd's part twice, data back) runs
as the example daemon's README shows it (tests/docs)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args: List[str], cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEUPDATE_")}
    env["PYTHONPATH"] = ROOT
    env["LIVEUPDATE_EMULATOR"] = os.path.join(cwd, "no-service.sock")
    return subprocess.run([sys.executable, "-m", "liveupdate", "emulator", "systemd", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "(hint: " in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("path", ["/dev/zero", "fifo", "directory"])
def test_a_unit_path_that_is_no_regular_file_neither_blocks_nor_reads_forever(tmp_path, path) -> None:
    os.mkfifo(tmp_path / "fifo")
    os.mkdir(tmp_path / "directory")
    line = one_line_error(run([path], str(tmp_path)))
    assert f"{path}: " in line and ("not a regular file" in line or "directory" in line.lower())


def test_an_oversized_unit_file_is_refused(tmp_path) -> None:
    (tmp_path / "big.service").write_bytes(b"#" * (2 << 20))
    assert "over 1048576 bytes" in one_line_error(run(["big.service"], str(tmp_path)))


def test_a_key_the_manager_does_not_play_names_its_file_and_line(tmp_path) -> None:
    (tmp_path / "x.service").write_text("[Service]\nExecStart=/bin/true\nPrivateNetwork=yes\n")
    line = one_line_error(run(["x.service"], str(tmp_path)))
    assert "x.service:3" in line and "PrivateNetwork" in line


def test_command_needs_exactly_one_unit(tmp_path) -> None:
    for name in ("a.service", "b.service"):
        (tmp_path / name).write_text("[Service]\nExecStart=/bin/true\n")
    assert "one unit" in one_line_error(run(["a.service", "b.service", "--", "/bin/true"], str(tmp_path)))
    assert "no unit file" in one_line_error(run([], str(tmp_path)))


def test_a_relative_command_is_taken_from_where_it_was_typed(tmp_path) -> None:
    # systemd takes only absolute paths: the CLI makes it one, as a shell
    # would run it, so the unit is refused only for want of a service
    (tmp_path / "x.service").write_text("[Service]\nExecStart=/opt/x\n")
    result = run(["x.service", "--", "./daemon.py"], str(tmp_path))
    assert result.returncode == 1
    assert f"{tmp_path}/daemon.py" in result.stderr and "ExecStart=" in result.stderr  # the hint
