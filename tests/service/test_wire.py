"""The wire format and the socket's path, without a service."""
from __future__ import annotations

import errno
import os
import socket
import stat
import sys

import pytest

from liveupdate.service import paths, protocol as P

#: Pure transport: runs even where the emulator cannot be imported.
NEEDS_EMULATOR = False


def test_messages_round_trip():
    raw = P.encode(P.OP_IOCTL, 0xFFFFFFFF, 0xBA40, b"abc", P.FLAG_FD)
    assert len(raw) == P.HEADER.size + 3 == 23
    assert P.decode(raw) == P.Message(P.OP_IOCTL, P.FLAG_FD, 0xFFFFFFFF, 0xBA40, b"abc")


def test_header_layout_is_the_documented_one():
    raw = P.encode(P.OP_KEXEC, 0x01020304, 0x0A0B0C0D, b"xy", P.FLAG_REPLY_CHANNEL)
    assert raw[:2] == b"LU" and raw[2] == P.PROTOCOL_VERSION and raw[3] == P.OP_KEXEC
    assert P.HEADER.size == 20
    assert int.from_bytes(raw[16:20], "little" if sys.byteorder == "little" else "big") == 2


@pytest.mark.parametrize("raw, truncated, code", [
    (b"", False, errno.EPROTO),
    (b"LU\x01", False, errno.EPROTO),
    (P.encode(P.OP_STATUS, 1)[:-1] + b"\x05", False, errno.EPROTO),
    (P.encode(P.OP_STATUS, 1) + b"extra", False, errno.EPROTO),
    (P.encode(P.OP_STATUS, 1), True, errno.EMSGSIZE),
])
def test_bad_messages_are_refused_with_an_errno(raw, truncated, code):
    with pytest.raises(P.ProtocolError) as caught:
        P.decode(raw, truncated)
    assert caught.value.errno == code


def test_oversized_payload_is_not_encoded():
    with pytest.raises(ValueError):
        P.encode(P.OP_STATUS, 1, payload=bytes(P.MAX_PAYLOAD + 1))


def test_received_fds_collects_every_fd_and_ignores_other_data():
    a, b = os.pipe()
    try:
        anc = P.fds_message([a, b]) + [(socket.SOL_SOCKET, 2, b"\0" * 12)]
        assert P.received_fds(anc) == [a, b]
        assert P.fds_message([]) == []
    finally:
        os.close(a)
        os.close(b)


def test_without_xdg_runtime_dir_the_user_must_name_a_path(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("LIVEUPDATE_EMULATOR", raising=False)
    assert paths.default_socket_path() is None
    with pytest.raises(OSError) as caught:
        paths.resolve_socket_path(None)
    assert caught.value.errno == errno.EINVAL
    assert "--socket" in str(caught.value)


def test_default_path_is_under_xdg_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("LIVEUPDATE_EMULATOR", raising=False)
    assert paths.resolve_socket_path(None) == str(tmp_path / paths.SOCKET_NAME)
    monkeypatch.setenv("LIVEUPDATE_EMULATOR", str(tmp_path / "x.sock"))
    assert paths.resolve_socket_path(None) == str(tmp_path / "x.sock")


def test_overlong_socket_path_is_refused(tmp_path):
    with pytest.raises(OSError) as caught:
        paths.resolve_socket_path(str(tmp_path / ("x" * 120)))
    assert caught.value.errno == errno.ENAMETOOLONG


def test_bind_listener_is_0600_replaces_stale_and_refuses_busy(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on any more
    old_umask = os.umask(0)
    try:
        listener = paths.bind_listener(path)
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(OSError) as caught:
            paths.bind_listener(path)
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        listener.close()
    regular = tmp_path / "file"
    regular.write_text("not a socket")
    with pytest.raises(OSError) as caught:
        paths.bind_listener(str(regular))
    assert caught.value.errno == errno.EEXIST
    assert regular.read_text() == "not a socket"
