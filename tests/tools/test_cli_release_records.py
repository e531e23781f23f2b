"""``release`` trusts no holder record: a record of the wrong shape is one
clear line, and a pid that now names another process (even one whose
command line says "hold") is never signalled."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from liveupdate.cli import hold, hold_record
from liveupdate.service import testing as service_testing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "liveupdate", *argv], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO), **kwargs)


@pytest.fixture
def bystander():
    """An unrelated process whose command line contains "hold"."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "hold", "cache"])
    try:
        deadline = time.monotonic() + 30
        while hold_record.process_start(proc.pid) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait(30)


def _plant(state, name: str, content) -> str:
    os.makedirs(state, exist_ok=True)
    path = hold._record_path(str(state), name)
    with open(path, "w") as out:
        out.write(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("content, why", [
    ("[]", "a JSON list, not an object"),
    ('{"pid": "12"}', "no positive integer pid"),
    ('{"pid": [1]}', "no positive integer pid"),
    ('{"pid": true}', "no positive integer pid"),
    ("{}", "no positive integer pid"),
    ('{"pid": 1, "session": "x", "tokens": [0]}', "no process start time"),
    ('{"pid": 1, "start": "soon", "boot_id": "", "session": "x", "tokens": []}', "start time"),
    ('{"pid": 1, "start": 5, "boot_id": "", "session": "x", "tokens": {}}', "tokens"),
    ("{not json", "not JSON"),
    ("\xff" * 10, "not JSON"),
])
def test_a_record_of_the_wrong_shape_is_one_clear_line(tmp_path, content, why):
    _plant(tmp_path, "cache", content)
    done = cli("release", "cache", "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "is not one `liveupdate hold` writes" in done.stderr and why in done.stderr, done.stderr


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "big"])
def test_a_record_that_is_no_small_regular_file_is_refused_quickly(tmp_path, target):
    path = hold._record_path(str(tmp_path), "cache")
    if target == "fifo":
        os.mkfifo(path)
    elif target == "big":
        with open(path, "wb") as out:
            out.truncate(1 << 30)  # sparse: the read is what must be bounded
    else:
        os.symlink(target, path)
    done = cli("release", "cache", "--state-dir", str(tmp_path))  # cli() times out after 60 s
    assert done.returncode == 1 and "is not one `liveupdate hold` writes" in done.stderr, done.stderr


def test_an_old_record_without_start_time_signals_nobody(tmp_path, bystander):
    _plant(tmp_path, "cache", {"pid": bystander.pid, "session": "cache", "tokens": [0]})
    done = cli("release", "cache", "--state-dir", str(tmp_path))
    assert done.returncode == 1 and "older version" in done.stderr
    assert bystander.poll() is None


def test_a_reused_pid_is_never_signalled(tmp_path, bystander):
    start = hold_record.process_start(bystander.pid)
    assert start is not None
    # The holder that wrote this record started at another time: the pid is
    # someone else's now.
    path = _plant(tmp_path, "cache", {"pid": bystander.pid, "start": start + 1, "boot_id": hold_record.boot_id(),
                                      "session": "cache", "tokens": [0]})
    done = cli("release", "cache", "--state-dir", str(tmp_path))
    assert done.returncode == 1 and "not held here" in done.stderr
    time.sleep(0.2)
    assert bystander.poll() is None
    assert not os.path.exists(path)  # the stale record is gone


def test_a_record_of_an_earlier_boot_signals_nobody(tmp_path, bystander):
    _plant(tmp_path, "cache", {"pid": bystander.pid, "start": hold_record.process_start(bystander.pid),
                               "boot_id": "an earlier boot", "session": "cache", "tokens": [0]})
    done = cli("release", "cache", "--state-dir", str(tmp_path))
    assert done.returncode == 1 and "not held here" in done.stderr
    assert bystander.poll() is None


@pytest.fixture
def service(tmp_path):
    (tmp_path / "svc").mkdir()
    with service_testing.running_service(tmp_path / "svc") as socket_path:
        yield socket_path


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as src:
            return src.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _hold(service, state, name):
    fd = os.memfd_create("held")
    os.write(fd, b"data")
    try:
        done = cli("hold", name, f"fd:{fd}", "--emulator", service, "--state-dir", state, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr


def test_the_record_identifies_the_holder(service, tmp_path):
    state = str(tmp_path / "state")
    _hold(service, state, "real")
    path = hold._record_path(state, "real")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = hold_record.read(path)
    assert data["start"] == hold_record.process_start(data["pid"])
    assert data["boot_id"] == hold_record.boot_id()
    done = cli("release", "real", "--state-dir", state)
    assert done.returncode == 0, done.stderr
    assert "are no longer preserved" in done.stdout
    assert _gone(data["pid"])


def test_release_after_an_emulated_kexec_says_the_files_were_handed_over(service, tmp_path):
    state = str(tmp_path / "state")
    _hold(service, state, "crossed")
    assert cli("emulator", "kexec", "--socket", service).returncode == 0
    done = cli("release", "crossed", "--state-dir", state)
    assert done.returncode == 0, done.stderr
    assert "handed over at the emulated kexec (boot 0 -> 1)" in done.stdout, done.stdout
    assert "no longer preserved" not in done.stdout


def test_hold_names_the_missing_service_not_the_device(tmp_path):
    done = cli("hold", "x", "fd:0", "--emulator", str(tmp_path / "none.sock"), "--state-dir", str(tmp_path))
    assert done.returncode == 1
    assert "/dev/liveupdate" not in done.stderr
    assert f"no emulator service is listening at {tmp_path / 'none.sock'}" in done.stderr
