"""Who may talk to the service, and what a hostile client can do to it."""
from __future__ import annotations

import array
import errno
import os
import pwd
import random
import shutil
import socket
import stat
import struct
import tempfile
import time

import pytest

from liveupdate import _abi
from liveupdate.service import client, protocol as P, testing

from .conftest import WAIT, wait_until


def _nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.settimeout(WAIT)
    return sock


def _reply(sock: socket.socket) -> P.Message:
    data, anc, flags, _ = sock.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
    for fd in P.received_fds(anc):
        os.close(fd)
    return P.decode(data, bool(flags & socket.MSG_TRUNC))


def _service_fds(service) -> int:
    return len(os.listdir(f"/proc/{service.pid}/fd"))


def _still_serves(service) -> None:
    started = time.monotonic()
    with service.open(timeout=WAIT) as dev:
        dev.create_session("still-here").close()
    assert service.status()["pid"] == service.pid
    assert time.monotonic() - started < WAIT


def test_socket_is_private_to_its_owner(service):
    mode = os.stat(service.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


@pytest.fixture
def reachable_service():
    """A service whose socket file other uids can reach (pytest's own
    directories are private to root), so that only the socket's mode and
    the service's credential check stand in their way."""
    directory = tempfile.mkdtemp(prefix="luo-svc-")
    os.chmod(directory, 0o711)
    svc = testing.ServiceProcess(directory)
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
def test_a_client_of_another_uid_cannot_even_connect(reachable_service, actors):
    other = actors(reachable_service.socket, "other-uid", _nobody())
    got = other.read()
    assert got["errno"] == errno.EACCES, got


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
def test_a_client_of_another_uid_is_refused_by_its_credentials(reachable_service, actors):
    # Even with the socket opened up to everyone, SO_PEERCRED stops the peer.
    os.chmod(reachable_service.socket, 0o666)
    other = actors(reachable_service.socket, "other-uid", _nobody())
    got = other.read()
    assert got["errno"] == errno.EACCES
    assert "may not use this emulator service" in got["message"]
    _still_serves(reachable_service)


@pytest.mark.parametrize("raw, code", [
    (b"hello", errno.EPROTO),
    (b"XY" + bytes(18), errno.EPROTO),
    (P.HEADER.pack(P.MAGIC, 99, P.OP_STATUS, 0, 0, 7, 0, 0), errno.EPROTONOSUPPORT),
    (P.HEADER.pack(P.MAGIC, 1, P.OP_STATUS, 0, 0, 7, 0, 100), errno.EPROTO),
    (P.HEADER.pack(P.MAGIC, 1, P.OP_STATUS, 0x80, 0, 7, 0, 0), errno.EPROTO),
    (P.HEADER.pack(P.MAGIC, 1, P.OP_STATUS, 0, 1, 7, 0, 0), errno.EPROTO),
    (P.encode(77, 7), errno.EPROTO),
    (P.encode(P.OP_IOCTL, 7, _abi.SESSION_GET_NAME, bytes(72)), errno.ENOTTY),
    (P.encode(P.OP_STATUS, 7, flags=P.FLAG_FD), errno.EPROTO),
    (P.encode(P.OP_STATUS, 7) + bytes(P.MAX_PAYLOAD + 10), errno.EMSGSIZE),
], ids=["garbage", "bad-magic", "version", "length", "flags", "reserved", "op", "ioctl-on-control",
        "missing-fd", "oversized"])
def test_malformed_requests_get_an_error_reply(service, raw, code):
    with _connect(service.socket) as sock:
        sock.send(raw)
        reply = _reply(sock)
        assert reply.value == code
        # The same connection still works afterwards.
        sock.send(P.encode(P.OP_STATUS, 8))
        assert _reply(sock).value == 0
    _still_serves(service)


def test_too_many_fds_are_refused_and_closed(service):
    before = _service_fds(service)
    pipes = [os.pipe() for _ in range(4)]
    fds = [fd for pair in pipes for fd in pair]
    with _connect(service.socket) as sock:
        sock.sendmsg([P.encode(P.OP_STATUS, 1, flags=P.FLAG_FD)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        assert _reply(sock).value == errno.EPROTO
    for fd in fds:
        os.close(fd)
    _still_serves(service)
    # The service closed every fd it got (its own closing of the probe
    # connections above may lag a moment behind).
    wait_until(lambda: _service_fds(service) <= before, "the service to close the received fds")


def test_empty_message_closes_only_that_connection(service):
    with _connect(service.socket) as sock:
        sock.send(b"")
        assert sock.recv(10) == b""
    _still_serves(service)


def test_a_useless_reply_channel_is_survived(service):
    with tempfile.TemporaryFile() as regular, _connect(service.socket) as sock:
        sock.sendmsg([P.encode(P.OP_STATUS, 1, flags=P.FLAG_REPLY_CHANNEL)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [regular.fileno()]))])
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.sendmsg([P.encode(P.OP_STATUS, 2, flags=P.FLAG_REPLY_CHANNEL)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [listener.fileno()]))])
        listener.close()
        sock.send(P.encode(P.OP_STATUS, 3))
        assert _reply(sock).seq == 3
    _still_serves(service)


def test_silent_and_flooding_clients_do_not_stall_the_others(service):
    silent = [_connect(service.socket) for _ in range(50)]
    half = _connect(service.socket)
    half.send(P.HEADER.pack(P.MAGIC, 1, P.OP_STATUS, 0, 0, 1, 0, 10))  # promises a payload it never sends
    flood = _connect(service.socket)
    flood.setblocking(False)
    sent = 0
    try:
        while sent < 100000:
            flood.send(P.encode(P.OP_STATUS, sent))
            sent += 1
    except BlockingIOError:
        pass  # the service stopped reading: this client's replies are not taken
    assert sent > 0
    _still_serves(service)
    for sock in silent + [half, flood]:
        sock.close()
    _still_serves(service)


def test_session_requests_cannot_reach_other_connections_ops(service):
    with service.open() as dev:
        session = dev.create_session("ops")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, os.dup(session.fileno()))
    with sock:
        sock.settimeout(WAIT)
        for op in (P.OP_OPEN_DEVICE, P.OP_KEXEC):
            sock.send(P.encode(op, 5))
            assert _reply(sock).value == errno.EPROTO
    assert service.status()["boot"] == 0
    session.close()


def test_a_session_ioctl_with_a_short_struct_gets_the_kernels_answer(service):
    with service.open() as dev:
        session = dev.create_session("short")
    port = client.port_for(service.socket)
    for arg in (b"", b"\x08\0\0\0", struct.pack("=I", 16)):
        with pytest.raises(OSError) as caught:
            port.ioctl(session.fileno(), _abi.SESSION_PRESERVE_FD, arg)
        assert caught.value.errno in (errno.EINVAL, errno.EFAULT)
    session.close()
    _still_serves(service)


def test_a_reply_fed_back_into_the_service_is_not_answered(service):
    # A session socket's client end given as the reply channel: the reply
    # lands on the service's own end of that session, where it must be
    # dropped rather than taken for a request (and answered, and so on).
    with service.open() as dev:
        session = dev.create_session("loop")
    with _connect(service.socket) as sock:
        sock.sendmsg([P.encode(P.OP_STATUS, 1, flags=P.FLAG_REPLY_CHANNEL)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [session.fileno()]))])
        sock.send(P.encode(P.OP_STATUS, 2))
        assert _reply(sock).seq == 2
    assert session.name == "loop"  # nothing stray is waiting on the session's socket
    session.close()
    _still_serves(service)


def test_replies_are_marked_so_the_client_rejects_requests_in_their_place():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        b.send(P.encode(P.OP_STATUS, 1))  # a request, not a reply
        with pytest.raises(OSError) as caught:
            client._await_reply(a, 1, WAIT)
        assert caught.value.errno == errno.EPROTO


def test_random_requests_on_every_kind_of_connection_never_break_the_service(service):
    """Seeded fuzzing: headers with random fields, payloads of random bytes
    (and random ioctl commands and structs), random fds attached, on a
    control, a device and a session connection. Whatever it does, the
    service keeps answering well-formed replies and ends consistent."""
    rng = random.Random(5)
    commands = list(_abi.COMMANDS.values()) + [0, 0xBA02, 0xBA44, 0x40BA00, rng.getrandbits(32)]
    memfd = os.memfd_create("fuzz")
    for kind in ("control", "device", "session"):
        with service.open(timeout=WAIT) as dev:
            session = dev.create_session(f"fuzz-{kind}")
            if kind == "device":
                target = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, os.dup(dev.fileno()))
            elif kind == "session":
                target = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, os.dup(session.fileno()))
            else:
                target = _connect(service.socket)
            target.settimeout(WAIT)
            answered = 0
            for i in range(400):
                op = rng.choice([P.OP_IOCTL] * 6 + [P.OP_STATUS, P.OP_OPEN_DEVICE, rng.randrange(256)])
                cmd = rng.choice(commands)
                payload = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 4, 8, 16, 72, 80, 300])))
                if rng.random() < 0.5 and len(payload) >= 4:
                    payload = struct.pack("=I", rng.choice([0, 8, 16, 72, 0xFFFFFFFF])) + payload[4:]
                flags = rng.choice([0, 0, P.FLAG_FD, P.FLAG_REPLY_CHANNEL, rng.randrange(8)])
                raw = P.encode(op, i, cmd, payload, flags)
                if rng.random() < 0.1:
                    raw = raw[: 1 + rng.randrange(len(raw))]  # truncated
                target.sendmsg([raw], P.fds_message([memfd] * rng.choice([0, 0, 1, 2])))
                # A well-formed request behind it: every answer to the fuzz
                # arrives before the answer to this one (one connection, in order).
                marker = 1_000_000 + i
                target.send(P.encode(P.OP_STATUS, marker))
                while True:
                    data, anc, _, _ = target.recvmsg(P.MAX_MESSAGE, P.ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
                    for fd in P.received_fds(anc):
                        os.close(fd)
                    assert data, f"{kind} connection closed by the service after {raw!r}"
                    reply = P.decode(data)  # every reply is well-formed
                    assert reply.flags & P.FLAG_REPLY
                    if reply.seq == marker and reply.op == P.OP_STATUS:
                        assert reply.value == 0
                        break
                    answered += 1
            assert answered > 300  # most fuzz got an answer (some are dropped or unanswerable)
            target.close()
            session.close()
        _still_serves(service)
    os.close(memfd)
    # Everything the fuzzing opened is released once its connections are gone.
    wait_until(lambda: service.status()["connections"]["session"] == 0, "every fuzzed session to be released")
    assert service.status()["connections"]["device"] == 0
