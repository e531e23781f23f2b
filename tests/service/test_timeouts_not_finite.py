"""Timeouts that are not finite, through the service client and the CLI:
inf (or 1e300) waits for ever, NaN and negatives are EINVAL, and neither an
OverflowError nor a bare ValueError gets out."""
from __future__ import annotations

import errno
import math
import os
import subprocess
import sys

import pytest

import liveupdate
from liveupdate.service import client
from liveupdate.errors import LiveUpdateError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*argv: str, env=None) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    return subprocess.run([sys.executable, "-m", "liveupdate", *argv], capture_output=True, text=True,
                          timeout=60, env=full, cwd=REPO)


@pytest.mark.parametrize("timeout", [math.inf, 1e300, 10**400])
def test_a_timeout_without_end_waits_and_answers(service, timeout):
    assert client.status(service.socket, timeout=timeout)["pid"] == service.pid


@pytest.mark.parametrize("timeout", [math.nan, -1, -math.inf, "5"])
def test_a_bad_timeout_is_einval(service, timeout):
    with pytest.raises(LiveUpdateError) as info:
        client.status(service.socket, timeout=timeout)
    assert info.value.errno == errno.EINVAL
    assert "timeout" in str(info.value)


@pytest.mark.parametrize("text", ["inf", "1e300", "Infinity"])
def test_the_environment_may_say_wait_for_ever(service, monkeypatch, text):
    monkeypatch.setenv(client.TIMEOUT_ENV, text)
    with liveupdate.open(emulator=service.socket) as dev:
        dev.create_session("forever").close()


@pytest.mark.parametrize("text", ["nan", "-1", "soon", "-inf"])
def test_a_bad_environment_timeout_is_einval_naming_the_variable(service, monkeypatch, text):
    monkeypatch.setenv(client.TIMEOUT_ENV, text)
    with pytest.raises(OSError) as info:
        liveupdate.open(emulator=service.socket)
    assert info.value.errno == errno.EINVAL
    assert client.TIMEOUT_ENV in str(info.value)


@pytest.mark.parametrize("timeout", [math.nan, -0.5])
def test_open_refuses_a_bad_busy_timeout(timeout):
    with pytest.raises(OSError) as info:
        liveupdate.open(backend="emulator", timeout=timeout)
    assert info.value.errno == errno.EINVAL


def test_open_waits_for_ever_on_inf():
    with liveupdate.open(backend="emulator", timeout=math.inf) as dev:
        assert dev.fileno() >= 0


@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_cli_timeout_without_end(service, value):
    done = _cli("emulator", "status", "--socket", service.socket, "--timeout", value)
    assert done.returncode == 0, done.stderr
    assert '"pid"' in done.stdout


@pytest.mark.parametrize("command", [["emulator", "status"], ["emulator", "kexec"], ["release", "x"]])
@pytest.mark.parametrize("value", ["nan", "-1"])
def test_cli_bad_timeout_is_a_usage_error(service, command, value):
    done = _cli(*command, "--socket" if command[0] == "emulator" else "--emulator", service.socket,
                f"--timeout={value}")
    assert done.returncode == 2, done.stderr
    assert f"'{value}' is not a timeout" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("value, code", [("inf", 0), ("nan", 1)])
def test_cli_environment_timeout(service, value, code):
    done = _cli("emulator", "status", "--socket", service.socket, env={client.TIMEOUT_ENV: value})
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    if code:
        assert len(done.stderr.strip().splitlines()) == 1
        assert client.TIMEOUT_ENV in done.stderr
