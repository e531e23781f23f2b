"""A session kept in systemd's fd store across a restart of its service.

The test plays systemd: it owns the notify socket the daemon pushes its
session fd to, keeps the fd while no daemon runs, and hands it to the next
daemon as fd 3 with LISTEN_FDS/LISTEN_FDNAMES, as systemd does at exec.
"""
from __future__ import annotations

import array
import os
import socket

from .actors import content
from .conftest import WAIT


def _receive_stored_fd(notify: socket.socket) -> tuple:
    data, anc, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
    fds = [fd for level, kind, raw in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]
    fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    return fields, fds


def test_session_survives_its_daemon_in_the_fd_store_and_crosses_a_kexec(service, actors, tmp_path, monkeypatch):
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(WAIT)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    monkeypatch.setenv("FDSTORE", "8")

    first = actors(service.socket, "store-and-exit", "db")
    assert first.read() == {"stored": "db"}
    assert first.finish() == 0
    fields, fds = _receive_stored_fd(notify)
    assert fields["FDSTORE"] == "1" and fields["FDNAME"] == "db" and len(fds) == 1
    stored = fds[0]
    # The daemon is gone; the store's fd alone keeps the session.
    assert service.status()["connections"]["session"] == 1

    monkeypatch.delenv("NOTIFY_SOCKET")
    # What systemd does between fork and exec: the stored fd becomes fd 3,
    # LISTEN_* describe it, LISTEN_PID names the process (kept by exec).
    second = actors(service.socket, "restarted", pass_fds=(3,), preexec_fn=lambda: os.dup2(stored, 3),
                    prefix=("/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh"),
                    env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "db"})
    assert second.read() == {"sessions": ["db"], "backends": ["service"]}
    os.close(stored)  # the store lets go; the new daemon holds the session

    service.kexec()
    assert second.finish() == 0
    with service.open() as dev:
        incoming = dev.retrieve_session("db")
    for token in (0, 1):
        fd = incoming.retrieve(token)
        assert os.pread(fd, 4096, 0) == content("db", token)
        os.close(fd)
    incoming.finish()
    incoming.close()
    notify.close()
