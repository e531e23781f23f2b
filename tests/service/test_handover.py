"""Across processes and an emulated kexec: the issue's headline scenario."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import liveupdate
from liveupdate.service import testing

from .actors import content
from .conftest import WAIT


def _kexec_command(sock: str, *front: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = testing._package_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", *front, "kexec", "--socket", sock], env=env,
                          capture_output=True, text=True, timeout=WAIT)


@pytest.mark.parametrize("command", [("liveupdate", "emulator"), ("liveupdate.service",)],
                         ids=["liveupdate-emulator-kexec", "python-m-liveupdate.service"])
def test_daemon_preserves_another_process_kexecs_a_third_retrieves(service, actors, command):
    daemon = actors(service.socket, "daemon", "cache", 5)
    assert daemon.read()["ready"]

    done = _kexec_command(service.socket, *command)
    assert done.returncode == 0, done.stderr
    assert "boot 1" in done.stdout

    retriever = actors(service.socket, "retrieve", "cache", 5)
    got = retriever.read()
    assert got["files"] == {str(t): content("cache", t).decode() for t in range(5)}
    assert retriever.finish() == 0
    assert daemon.finish() == 0  # its old handle is stale now; closing it is fine


def test_old_handles_are_stale_after_kexec(service, tmp_path):
    dev = service.open()
    session = dev.create_session("before")
    memfd = os.memfd_create("m")
    os.write(memfd, b"kept")
    session.preserve(memfd, 1)
    dev.close()

    info = service.kexec()
    assert info["boot"] == 1

    with pytest.raises(liveupdate.StaleHandleError) as caught:
        session.preserve(memfd, 2)
    assert caught.value.errno == errno.ESTALE
    assert "kexec" in str(caught.value)
    with pytest.raises(liveupdate.StaleHandleError):
        session.name
    session.close()

    with service.open() as dev:
        incoming = dev.retrieve_session("before")
    fd = incoming.retrieve(1)
    assert os.pread(fd, 10, 0) == b"kept"
    incoming.finish()
    incoming.close()
    os.close(fd)
    os.close(memfd)


def test_a_device_held_across_kexec_turns_stale_and_frees_the_device(service):
    dev = service.open()
    service.kexec()
    with pytest.raises(liveupdate.StaleHandleError):
        dev.create_session("x")
    # The new kernel's device is free although the old handle is still open.
    with service.open() as fresh:
        fresh.create_session("x").close()
    dev.close()


def test_unretrieved_sessions_are_gone_after_the_next_kexec(service):
    with service.open() as dev:
        session = dev.create_session("once")
    service.kexec()
    session.close()
    service.kexec()
    with service.open() as dev:
        with pytest.raises(FileNotFoundError):
            dev.retrieve_session("once")


def test_kexec_without_a_service_says_how_to_start_one(tmp_path):
    sock = str(tmp_path / "nobody.sock")
    done = _kexec_command(sock, "liveupdate", "emulator")
    assert done.returncode == 1
    assert "emulator serve" in done.stderr


def test_open_finds_the_service_by_argument_and_by_environment(service, monkeypatch):
    with liveupdate.open(emulator=service.socket) as dev:
        assert dev.backend == "service"
    if os.path.exists(liveupdate.DEFAULT_PATH):
        pytest.skip("this machine has the real device, which backend='auto' prefers")
    monkeypatch.setenv("LIVEUPDATE_EMULATOR", service.socket)
    with liveupdate.open() as dev:
        assert dev.backend == "service"
        dev.create_session("by-env").close()
