"""Session handles are real fds: their lifetime is the kernel's file lifetime."""
from __future__ import annotations

import array
import errno
import gc
import fcntl
import os
import signal
import socket

import pytest

import liveupdate
from liveupdate.service import client

from .conftest import WAIT, wait_child, wait_until


def _sessions(service) -> int:
    return service.status()["connections"]["session"]


def test_a_sigkilled_clients_sessions_are_released_as_on_close(service, actors):
    holder = actors(service.socket, "daemon", "victim", 3)
    assert holder.read()["ready"]
    assert _sessions(service) == 1
    os.kill(holder.pid, signal.SIGKILL)
    holder.proc.wait(WAIT)
    wait_until(lambda: _sessions(service) == 0, "the service to see the session's EOF")
    # Released, not merely forgotten: the name is free again and its files
    # are no longer preserved, so nothing of it crosses the next kexec.
    with service.open() as dev:
        dev.create_session("victim").close()
    service.kexec()
    with service.open() as dev:
        with pytest.raises(FileNotFoundError):
            dev.retrieve_session("victim")


def test_a_sigkilled_device_holder_frees_the_device(service, actors):
    holder = actors(service.socket, "hold-device")
    assert holder.read()["ready"]
    with pytest.raises(liveupdate.BusyError):
        service.open()
    os.kill(holder.pid, signal.SIGKILL)
    holder.proc.wait(WAIT)
    service.open(timeout=WAIT).close()


def test_closing_one_copy_keeps_the_session_until_the_last_copy_goes(service):
    with service.open() as dev:
        session = dev.create_session("shared")
    copy = os.dup(session.fileno())
    session.close()
    assert _sessions(service) == 1
    with service.open() as dev:
        with pytest.raises(FileExistsError):
            dev.create_session("shared")
    os.close(copy)
    wait_until(lambda: _sessions(service) == 0, "release after the last close")
    with service.open() as dev:
        dev.create_session("shared").close()


def test_session_fd_survives_exec_and_is_adopted_by_from_fd(service, actors):
    with service.open() as dev:
        session = dev.create_session("inherited")
    fd = session.fileno()
    # Session fds are close-on-exec like the kernel's; inheriting one is explicit.
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    child = actors(str(fd), "adopt", pass_fds=(fd,))
    assert child.read() == {"name": "inherited", "backend": "service"}
    assert child.finish() == 0
    assert session.name == "inherited"  # the child's close left ours alone
    session.close()


def test_session_fd_passed_with_scm_rights_works_in_both_processes(service):
    with service.open() as dev:
        session = dev.create_session("passed")
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            parent_sock.close()
            child_sock.settimeout(WAIT)
            _, anc, _, _ = child_sock.recvmsg(1, socket.CMSG_SPACE(4))
            fd = array.array("i", anc[0][2])[0]
            adopted = liveupdate.Session.from_fd(fd)
            for token in range(100, 150):
                memfd = os.memfd_create("c")
                os.write(memfd, b"child%d" % token)
                adopted.preserve(memfd, token)
                os.close(memfd)
                assert adopted.name == "passed"
            code = 0
        finally:
            os._exit(code)
    child_sock.close()
    parent_sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [session.fileno()]))])
    # Both processes talk on the same socket at once; each must get its own replies.
    for token in range(50):
        memfd = os.memfd_create("p")
        os.write(memfd, b"parent%d" % token)
        session.preserve(memfd, token)
        os.close(memfd)
        assert session.name == "passed"
    assert wait_child(pid) == 0
    parent_sock.close()
    service.kexec()
    session.close()
    with service.open() as dev:
        incoming = dev.retrieve_session("passed")
    for token, want in [(0, b"parent0"), (49, b"parent49"), (100, b"child100"), (149, b"child149")]:
        fd = incoming.retrieve(token)
        assert os.pread(fd, 20, 0) == want
        os.close(fd)
    incoming.finish()
    incoming.close()


def test_forked_child_shares_the_device_and_its_replies_go_to_it(service):
    dev = service.open()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        code = 1
        try:
            for i in range(30):
                dev.create_session(f"child-{i}").detach()
            code = 0
        finally:
            os._exit(code)
    names = [dev.create_session(f"parent-{i}") for i in range(30)]
    assert wait_child(pid) == 0
    assert [s.name for s in names] == [f"parent-{i}" for i in range(30)]
    for s in names:
        s.close()
    dev.close()


def test_retrieved_fds_are_close_on_exec_and_keep_contents(service):
    with service.open() as dev:
        session = dev.create_session("files")
    memfd = os.memfd_create("f")
    os.write(memfd, b"0123456789")
    os.lseek(memfd, 3, os.SEEK_SET)
    session.preserve(memfd, 9)
    service.kexec()
    session.close()
    with service.open() as dev:
        incoming = dev.retrieve_session("files")
    fd = incoming.retrieve(9)
    again = incoming.retrieve(9)
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.pread(fd, 100, 0) == b"0123456789"
    assert os.lseek(fd, 0, os.SEEK_CUR) == 3
    assert os.fstat(fd).st_ino == os.fstat(again).st_ino
    for f in (fd, again, memfd):
        os.close(f)
    incoming.close()


def test_from_fd_tells_service_sessions_from_other_sockets(service):
    plain_a, plain_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stream_a, stream_b = socket.socketpair()
    read_end, write_end = os.pipe()
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctl.connect(service.socket)
    try:
        for fd in (plain_a.fileno(), stream_a.fileno(), read_end, ctl.fileno()):
            assert not client.is_session_socket(fd)
            with pytest.raises(OSError) as caught:
                liveupdate.Session.from_fd(fd)
            assert caught.value.errno == errno.ENOTTY
        with service.open() as dev:
            session = dev.create_session("real")
        assert client.is_session_socket(session.fileno())
        session.close()
    finally:
        for s in (plain_a, plain_b, stream_a, stream_b, ctl):
            s.close()
        os.close(read_end)
        os.close(write_end)


def test_a_stopped_service_makes_clients_fail_not_hang(tmp_path):
    from liveupdate.service import testing

    svc = testing.ServiceProcess(tmp_path).start()
    try:
        dev = svc.open()
        session = dev.create_session("orphan")
        svc.kill()
        with pytest.raises(OSError) as caught:
            session.name
        assert caught.value.errno in (errno.ECONNRESET, errno.EPIPE)
        session.close()
        dev.close()
    finally:
        svc.stop()


def test_a_frozen_service_times_out_instead_of_hanging(service, monkeypatch):
    with service.open() as dev:
        session = dev.create_session("patient")
    monkeypatch.setenv(client.TIMEOUT_ENV, "0.5")
    os.kill(service.pid, signal.SIGSTOP)
    try:
        with pytest.raises(OSError) as caught:
            session.name
        assert caught.value.errno == errno.ETIMEDOUT
        assert client.TIMEOUT_ENV in str(caught.value)
    finally:
        os.kill(service.pid, signal.SIGCONT)
    monkeypatch.setenv(client.TIMEOUT_ENV, str(WAIT))
    # The late answer to the abandoned request is discarded, not mistaken
    # for the answer to the next one.
    assert session.name == "patient"
    session.close()


def test_no_fd_leaks_in_the_client_on_any_path(service):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()  # an earlier test's garbage must not close its fds mid-count
    before = open_fds()
    memfd = os.memfd_create("leak")
    for i in range(300):
        with service.open() as dev:
            session = dev.create_session(f"leak-{i}")
            with pytest.raises(FileExistsError):
                dev.create_session(f"leak-{i}")
        session.preserve(memfd, 1)
        with pytest.raises(OSError):
            session.preserve(10**6, 2)  # EBADF: the fd cannot travel
        adopted = liveupdate.Session.from_fd(session.detach())  # private reply channels
        assert adopted.name == f"leak-{i}"
        with pytest.raises(FileExistsError):
            adopted.preserve(memfd, 1)
        adopted.close()
    os.close(memfd)
    assert open_fds() == before
