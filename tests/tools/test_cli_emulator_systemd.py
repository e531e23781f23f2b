"""``liveupdate emulator systemd``: what it refuses before it starts
anything, each in one line with a hint. The whole flow (units started,
``liveupdate emulator kexec`` doing systemd's part twice, data back) runs
as the example daemon's README shows it (tests/docs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args: List[str], cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEUPDATE_")}
    env["PYTHONPATH"] = ROOT
    env["LIVEUPDATE_EMULATOR"] = os.path.join(cwd, "no-service.sock")
    return subprocess.run([sys.executable, "-m", "liveupdate", "emulator", "systemd", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def refuse(tmp_path, monkeypatch, capsys):
    """The command run in this process, for refusals that come before it
    starts anything (a child Python per case costs seconds in the TCG guest
    of the VM tier)."""
    from liveupdate.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIVEUPDATE_EMULATOR", str(tmp_path / "no-service.sock"))

    def run_here(args: List[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(["emulator", "systemd", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run_here


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "(hint: " in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize("path", ["/dev/zero", "fifo", "directory"])
def test_a_unit_path_that_is_no_regular_file_neither_blocks_nor_reads_forever(tmp_path, refuse, path) -> None:
    os.mkfifo(tmp_path / "fifo")
    os.mkdir(tmp_path / "directory")
    line = one_line_error(refuse([path]))
    assert f"{path}: " in line and ("not a regular file" in line or "directory" in line.lower())


def test_an_oversized_unit_file_is_refused(tmp_path, refuse) -> None:
    (tmp_path / "big.service").write_bytes(b"#" * (2 << 20))
    assert "over 1048576 bytes" in one_line_error(refuse(["big.service"]))


def test_a_key_the_manager_does_not_play_names_its_file_and_line(tmp_path, refuse) -> None:
    (tmp_path / "x.service").write_text("[Service]\nExecStart=/bin/true\nPrivateNetwork=yes\n")
    line = one_line_error(refuse(["x.service"]))
    assert "x.service:3" in line and "PrivateNetwork" in line


def test_command_needs_exactly_one_unit(tmp_path, refuse) -> None:
    for name in ("a.service", "b.service"):
        (tmp_path / name).write_text("[Service]\nExecStart=/bin/true\n")
    assert "one unit" in one_line_error(refuse(["a.service", "b.service", "--", "/bin/true"]))
    assert "no unit file" in one_line_error(refuse([]))


def test_a_relative_command_is_taken_from_where_it_was_typed(tmp_path) -> None:
    # systemd takes only absolute paths: the CLI makes it one, as a shell
    # would run it, so the unit is refused only for want of a service
    (tmp_path / "x.service").write_text("[Service]\nExecStart=/opt/x\n")
    result = run(["x.service", "--", "./daemon.py"], str(tmp_path))
    assert result.returncode == 1
    assert f"{tmp_path}/daemon.py" in result.stderr and "ExecStart=" in result.stderr  # the hint


DAEMON = r'''
import json, os, sys, time
import liveupdate
from liveupdate import systemd

report = sys.argv[1]
passed = {entry.name: entry.fd for entry in systemd.listen_fds()}
if passed:
    session = liveupdate.Session.from_fd(passed["sess"])
    with session, open(report, "a") as out:
        fd = session.retrieve(5)
        out.write(json.dumps({"names": sorted(passed), "data": os.pread(passed["data"], 64, 0).decode(),
                              "state": session.state, "in_session": os.pread(fd, 64, 0).decode()}) + "\n")
        os.close(fd)
        session.finish()
else:
    data = os.memfd_create("data")
    os.write(data, b"in the fd store")
    systemd.store_fd(data, "data")
    with liveupdate.open() as dev:
        session = dev.create_session("own-sess")
    fd = os.memfd_create("x")
    os.write(fd, b"in the session")
    session.preserve(fd, 5)
    systemd.store_session(session, "sess")
    systemd.barrier()
systemd.notify("READY=1")
while True:
    time.sleep(60)
'''

UNIT = """[Service]
Type=notify
ExecStart=/usr/local/bin/daemon
FileDescriptorStoreMax=4
FileDescriptorStorePreserve=yes

[Install]
WantedBy=multi-user.target
"""


def test_a_memfd_and_a_session_survive_an_emulated_systemctl_kexec(tmp_path) -> None:
    from liveupdate.service.testing import ServiceProcess

    (tmp_path / "daemon.py").write_text(DAEMON)
    (tmp_path / "d.service").write_text(UNIT)
    report = tmp_path / "report.jsonl"
    service = ServiceProcess(tmp_path, image=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEUPDATE_")}
    env.update(PYTHONPATH=ROOT, LIVEUPDATE_EMULATOR=service.socket, LIVEUPDATE_BACKEND="service")
    manager = subprocess.Popen(
        [sys.executable, "-m", "liveupdate", "emulator", "systemd", "--ready-file", str(tmp_path / "ready"),
         "d.service", "--", sys.executable, "daemon.py", str(report)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            if (tmp_path / "ready").exists() or manager.poll() is not None:
                break
            time.sleep(0.05)
        assert (tmp_path / "ready").exists(), manager.communicate(timeout=10)[0]
        kexec = subprocess.run([sys.executable, "-m", "liveupdate", "emulator", "kexec"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert kexec.returncode == 0, kexec.stderr
        assert "fd stores preserved in session 'systemd'" in kexec.stderr
        assert "fd stores restored, KExecCount=1" in kexec.stderr
        assert json.loads(report.read_text()) == {"names": ["data", "sess"], "data": "in the fd store",
                                                  "state": "incoming", "in_session": "in the session"}
        # the image the service wrote at the kexec: systemd's session, decoded
        inspect = subprocess.run([sys.executable, "-m", "liveupdate", "inspect", service.image], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert inspect.returncode == 0, inspect.stderr
        assert ("  systemd's mapping (token 0): version 1, KExecCount 0, 1 unit(s)\n"
                "    unit d.service: 2 fd store entries\n"
                "      'sess': session 'own-sess': a session in this image\n"
                "      'data': token 1: memfd of 15 bytes\n") in inspect.stdout
    finally:
        manager.terminate()
        output = manager.communicate(timeout=30)[0]
        service.stop()
    assert manager.returncode == 0, output
    assert "services stopped" in output
