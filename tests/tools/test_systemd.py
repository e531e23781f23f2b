"""liveupdate.systemd against a fake systemd: a NOTIFY_SOCKET bound here,
and LISTEN_FDS set up here the way systemd sets them up before exec."""
from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import threading
import uuid
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

import liveupdate
from liveupdate import systemd
from . import child_report

# -- a fake systemd notify socket ------------------------------------------


class FakeNotify:
    """The receiving end of sd_notify: a datagram socket at a path or an
    abstract name, as systemd binds it."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address  # what NOTIFY_SOCKET says
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(bind_to)

    def env(self, **extra: str) -> Dict[str, str]:
        env = {"NOTIFY_SOCKET": self.address, "FDSTORE": "16"}
        env.update(extra)
        return env

    def receive(self, timeout: float = 10.0) -> Tuple[str, List[int]]:
        """One datagram: its text and the fds that came with it (owned by the caller)."""
        self.sock.settimeout(timeout)
        fd_size = array.array("i").itemsize
        data, ancdata, flags, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * fd_size))
        assert not flags & socket.MSG_CTRUNC
        fds: List[int] = []
        for level, kind, payload in ancdata:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % fd_size])
            fds.extend(got)
        return data.decode(), fds

    def nothing_pending(self) -> bool:
        try:
            self.sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path) -> Iterator[FakeNotify]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        fake = FakeNotify(path, path)
    else:
        name = f"liveupdate-test-{uuid.uuid4().hex}"
        fake = FakeNotify("@" + name, "\0" + name)
    yield fake
    fake.close()


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# -- session fds from whichever emulator exists ----------------------------


@pytest.fixture(scope="module")
def _service(tmp_path_factory):
    try:
        from liveupdate.service import testing as service_testing
    except ImportError as exc:
        pytest.skip(f"the emulator service is not available here: {exc}")
    try:
        with service_testing.running_service(tmp_path_factory.mktemp("luo-service")) as path:
            yield path
    except ImportError as exc:
        pytest.skip(f"the emulator service cannot start here: {exc}")


@pytest.fixture(params=["emulator", "service"])
def device(request):
    """An open Live Update device of an emulator (this machine has no real one)."""
    if request.param == "emulator":
        try:
            emu = liveupdate.Emulator()
        except (ImportError, AttributeError) as exc:
            pytest.skip(f"the in-process emulator is not available here: {exc}")
        dev = emu.open()
    else:
        dev = liveupdate.open(backend="service", emulator=request.getfixturevalue("_service"))
    yield dev
    dev.close()


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cache", "a", "x" * 255, "with space", "dots.and-dashes_1", "~!@#$%^&*()"])
def test_valid_fd_names(name: str) -> None:
    assert systemd.fdname_is_valid(name)


@pytest.mark.parametrize("name", ["", "x" * 256, "a:b", "tab\there", "new\nline", "del\x7f", "é", None, b"cache"])
def test_invalid_fd_names(name: Any) -> None:
    assert not systemd.fdname_is_valid(name)


# -- pushing into the fd store --------------------------------------------


def test_store_fd_sends_fdstore_message_with_the_fd(notify_socket: FakeNotify) -> None:
    fd = os.memfd_create("payload")
    try:
        os.write(fd, b"kept by systemd")
        systemd.store_fd(fd, "cache", environ=notify_socket.env())
        text, fds = notify_socket.receive()
        assert text == "FDSTORE=1\nFDNAME=cache"
        assert len(fds) == 1
        assert same_file(fds[0], fd)
        assert os.pread(fds[0], 100, 0) == b"kept by systemd"
        os.close(fds[0])
        os.fstat(fd)  # still ours, still open
    finally:
        os.close(fd)


def test_store_fd_reads_the_process_environment(notify_socket: FakeNotify, monkeypatch) -> None:
    for key, value in notify_socket.env().items():
        monkeypatch.setenv(key, value)
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(os.dup(write_end), "wb") as as_file:
            systemd.store_fd(as_file, "pipe", poll=False)  # an object with fileno() works too
        text, fds = notify_socket.receive()
        assert text == "FDSTORE=1\nFDNAME=pipe\nFDPOLL=0"
        assert same_file(fds[0], write_end)
        os.close(fds[0])
    finally:
        os.close(read_end)
        os.close(write_end)


def test_store_fd_refuses_an_invalid_name_without_sending(notify_socket: FakeNotify) -> None:
    with pytest.raises(OSError) as info:
        systemd.store_fd(0, "a:b", environ=notify_socket.env())
    assert info.value.errno == errno.EINVAL
    assert "a:b" in str(info.value)
    assert notify_socket.nothing_pending()


def test_store_fd_outside_systemd_is_enxio() -> None:
    with pytest.raises(OSError) as info:
        systemd.store_fd(0, "cache", environ={})
    assert info.value.errno == errno.ENXIO
    assert "NOTIFY_SOCKET" in str(info.value)


def test_store_fd_without_an_fd_store_is_enospc(notify_socket: FakeNotify) -> None:
    env = notify_socket.env()
    del env["FDSTORE"]
    with pytest.raises(OSError) as info:
        systemd.store_fd(0, "cache", environ=env)
    assert info.value.errno == errno.ENOSPC
    assert "FileDescriptorStoreMax" in str(info.value)
    assert notify_socket.nothing_pending()
    # Asked not to check, it sends anyway (systemd decides).
    systemd.store_fd(0, "cache", environ=env, require_store=False)
    text, fds = notify_socket.receive()
    assert text == "FDSTORE=1\nFDNAME=cache"
    for fd in fds:
        os.close(fd)


def test_nobody_listening(tmp_path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody"), "FDSTORE": "1"}
    with pytest.raises(OSError) as info:
        systemd.store_fd(0, "cache", environ=env)
    assert info.value.errno in (errno.ENOENT, errno.ECONNREFUSED)
    assert "nobody listens" in str(info.value)


@pytest.mark.parametrize("address", ["vsock:2:1234", "relative/path", "x"])
def test_unsupported_notify_addresses(address: str) -> None:
    with pytest.raises(OSError) as info:
        systemd.notify("READY=1", environ={"NOTIFY_SOCKET": address})
    assert info.value.errno == errno.EAFNOSUPPORT
    assert address in str(info.value)


def test_too_long_socket_path() -> None:
    with pytest.raises(OSError) as info:
        systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "/" + "x" * 200})
    assert info.value.errno == errno.ENAMETOOLONG


def test_notify_without_socket_is_a_quiet_no(notify_socket: FakeNotify) -> None:
    assert systemd.notify("READY=1", environ={}) is False
    assert systemd.notify("READY=1", environ=notify_socket.env()) is True
    assert notify_socket.receive() == ("READY=1", [])


def test_remove_fd(notify_socket: FakeNotify) -> None:
    systemd.remove_fd("cache", environ=notify_socket.env())
    assert notify_socket.receive() == ("FDSTOREREMOVE=1\nFDNAME=cache", [])
    with pytest.raises(OSError) as info:
        systemd.remove_fd("", environ=notify_socket.env())
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        systemd.remove_fd("cache", environ={})
    assert info.value.errno == errno.ENXIO


def test_barrier_returns_once_systemd_closed_its_copy(notify_socket: FakeNotify) -> None:
    received: List[str] = []

    def fake_systemd() -> None:
        text, fds = notify_socket.receive()
        received.append(text)
        for fd in fds:
            os.close(fd)  # what systemd does once it processed all before

    thread = threading.Thread(target=fake_systemd)
    thread.start()
    try:
        assert systemd.barrier(timeout=30, environ=notify_socket.env()) is True
    finally:
        thread.join(30)
    assert received == ["BARRIER=1"]


def test_barrier_that_is_never_answered_fails(notify_socket: FakeNotify) -> None:
    with pytest.raises(OSError) as info:
        systemd.barrier(timeout=0.01, environ=notify_socket.env())
    assert info.value.errno == errno.ETIMEDOUT
    _, fds = notify_socket.receive()  # the fake systemd still holds the pipe
    for fd in fds:
        os.close(fd)


def test_barrier_outside_systemd() -> None:
    assert systemd.barrier(environ={}) is False


# -- sessions into the store --------------------------------------------------


def test_store_session_is_named_after_the_session(notify_socket: FakeNotify, device) -> None:
    session = device.create_session("cache-v1")
    try:
        assert systemd.store_session(session, environ=notify_socket.env()) == "cache-v1"
        text, fds = notify_socket.receive()
        assert text == "FDSTORE=1\nFDNAME=cache-v1"
        # What systemd holds is the session itself.
        held = liveupdate.Session.from_fd(fds[0])
        assert held.name == "cache-v1"
        held.close()
        assert session.name == "cache-v1"  # still usable here
    finally:
        session.close()


def test_store_session_with_a_name_systemd_would_refuse(notify_socket: FakeNotify, device) -> None:
    session = device.create_session("db:primary")
    try:
        with pytest.raises(OSError) as info:
            systemd.store_session(session, environ=notify_socket.env())
        assert info.value.errno == errno.EINVAL
        assert "name=" in str(info.value)
        assert systemd.store_session(session, "db-primary", environ=notify_socket.env()) == "db-primary"
        text, fds = notify_socket.receive()
        assert text == "FDSTORE=1\nFDNAME=db-primary"
        for fd in fds:
            os.close(fd)
    finally:
        session.close()


def test_store_closed_session_is_ebadf(notify_socket: FakeNotify, device) -> None:
    session = device.create_session("gone")
    session.close()
    with pytest.raises(OSError) as info:
        systemd.store_session(session, environ=notify_socket.env())
    assert info.value.errno == errno.EBADF


# -- after a restart: LISTEN_FDS -------------------------------------------


def in_child_with_listen_fds(fds: List[int], names: Optional[List[str]], work, *, pid_offset: int = 0) -> Any:
    """Run ``work()`` in a forked child whose fds 3.. are ``fds`` and whose
    environment says LISTEN_FDS as systemd would. Returns ``{"ok": result}``
    (through JSON) or ``{"error": text, "errno": n}`` for what it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        result: Dict[str, Any]
        out = fcntl.fcntl(write_end, fcntl.F_DUPFD, 200)  # clear of 3.., where the fds go
        try:
            sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 201) for fd in fds]
            for offset, source in enumerate(sources):
                os.dup2(source, 3 + offset, inheritable=True)
                os.close(source)
            os.environ["LISTEN_PID"] = str(os.getpid() + pid_offset)
            os.environ["LISTEN_FDS"] = str(len(fds))
            if names is None:
                os.environ.pop("LISTEN_FDNAMES", None)
            else:
                os.environ["LISTEN_FDNAMES"] = ":".join(names)
            result = {"ok": work()}
        except BaseException as exc:  # report everything, the parent asserts
            result = {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
        try:
            os.write(out, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    report = child_report.collect(read_end, pid)
    return report


def test_listen_fds_with_names() -> None:
    a_read, a_write = os.pipe()
    memfd = os.memfd_create("x")
    try:

        def work():
            found = systemd.listen_fds(unset_environment=True)
            return {
                "found": [[entry.fd, entry.name] for entry in found],
                "cloexec": [not os.get_inheritable(entry.fd) for entry in found],
                "env_left": [key for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if key in os.environ],
            }

        report = in_child_with_listen_fds([a_read, memfd], ["pipe", "blob"], work)
        assert report == {"ok": {"found": [[3, "pipe"], [4, "blob"]], "cloexec": [True, True], "env_left": []}}
    finally:
        for fd in (a_read, a_write, memfd):
            os.close(fd)


def test_listen_fds_without_names_are_unknown() -> None:
    memfd = os.memfd_create("x")
    try:
        report = in_child_with_listen_fds([memfd], None, lambda: [[e.fd, e.name] for e in systemd.listen_fds()])
        assert report == {"ok": [[3, "unknown"]]}
    finally:
        os.close(memfd)


def test_listen_fds_for_another_process_are_not_ours() -> None:
    memfd = os.memfd_create("x")
    try:
        work = lambda: [len(systemd.listen_fds()), sorted(systemd.find_sessions())]  # noqa: E731
        report = in_child_with_listen_fds([memfd], ["blob"], work, pid_offset=1)
        assert report == {"ok": [0, []]}
    finally:
        os.close(memfd)


@pytest.mark.parametrize(
    "env, what",
    [
        ({"LISTEN_PID": "self", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"}, "LISTEN_FDNAMES"),
    ],
)
def test_malformed_listen_variables(env: Dict[str, str], what: str) -> None:
    env = dict(env)
    env.setdefault("LISTEN_PID", str(os.getpid()))
    with pytest.raises(OSError) as info:
        systemd.listen_fds(environ=env)
    assert info.value.errno == errno.EINVAL
    assert what in str(info.value)


def test_listed_fd_that_is_not_open_is_ebadf() -> None:
    def work():
        os.close(4)
        return systemd.listen_fds()

    memfd = os.memfd_create("x")
    try:
        report = in_child_with_listen_fds([memfd, memfd], ["a", "b"], work)
        assert report["errno"] == errno.EBADF, report
    finally:
        os.close(memfd)


def test_find_sessions_takes_the_sessions_and_leaves_the_rest(device) -> None:
    first = device.create_session("alpha")
    second = device.create_session("beta")
    other = os.memfd_create("not-a-session")
    try:

        def work():
            sessions = systemd.find_sessions()
            still_open = os.fstat(4).st_ino == os.fstat(4).st_ino  # raises EBADF if closed
            return {
                "names": sorted(sessions),
                "kernel_names": {name: session.name for name, session in sessions.items()},
                "fds": {name: session.fileno() for name, session in sessions.items()},
                "state": sorted({session.state for session in sessions.values()}),
                "other_open": still_open,
            }

        # Stored under other names: the key is the fd store name (what a
        # unit's LUOSession= or store_session(name=) says), the session
        # keeps its kernel name, and the kernel says it is still outgoing.
        report = in_child_with_listen_fds(
            [first.fileno(), other, second.fileno()], ["store-a", "blob", "store-b"], work
        )
        assert report == {
            "ok": {"names": ["store-a", "store-b"], "kernel_names": {"store-a": "alpha", "store-b": "beta"},
                   "fds": {"store-a": 3, "store-b": 5}, "state": ["outgoing"], "other_open": True}
        }
    finally:
        first.close()
        second.close()
        os.close(other)


def test_find_sessions_keeps_the_first_of_duplicates(device) -> None:
    session = device.create_session("twice")
    try:

        def work():
            sessions = systemd.find_sessions()
            os.fstat(4)  # the duplicate is left open
            return {name: s.fileno() for name, s in sessions.items()}

        # Two fd store entries of one name (systemd keeps both when the
        # files differ): the first is adopted.
        report = in_child_with_listen_fds([session.fileno(), session.fileno()], ["a", "a"], work)
        assert report == {"ok": {"a": 3}}
    finally:
        session.close()


def test_find_sessions_without_listen_fds() -> None:
    assert systemd.find_sessions(environ={}) == {}
