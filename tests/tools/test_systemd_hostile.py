"""liveupdate.systemd when the world around it misbehaves: a systemd that
stops reading its notify socket, fds in LISTEN_FDS that are not what they
seem, and LISTEN_* variables that are lies (hardening issue, items 11-13)."""
from __future__ import annotations

import errno
import fcntl
import math
import os
import socket
import time
from typing import Any, Dict, List

import pytest

import liveupdate
from liveupdate import systemd

from .test_systemd import FakeNotify, in_child_with_listen_fds


@pytest.fixture
def deaf_systemd(tmp_path):
    """A notify socket nobody reads: its queue fills after a few datagrams."""
    path = str(tmp_path / "deaf")
    fake = FakeNotify(path, path)
    yield fake
    fake.close()


def fill_queue(fake: FakeNotify) -> int:
    sent = 0
    while True:
        try:
            systemd.notify("STATUS=filling", timeout=0, environ=fake.env())
        except OSError as exc:
            assert exc.errno == errno.EAGAIN, exc
            return sent
        sent += 1
        assert sent < 100_000


def test_a_full_queue_is_eagain_in_bounded_time(deaf_systemd) -> None:
    sent = fill_queue(deaf_systemd)
    assert sent > 0
    fd = os.memfd_create("x")
    try:
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            systemd.store_fd(fd, "cache", timeout=0.2, environ=deaf_systemd.env())
        assert info.value.errno == errno.EAGAIN
        assert "queue" in str(info.value)
        assert time.monotonic() - start < 5
    finally:
        os.close(fd)


def test_a_barrier_times_out_even_when_its_send_cannot_go(deaf_systemd) -> None:
    fill_queue(deaf_systemd)
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        systemd.barrier(timeout=0.3, environ=deaf_systemd.env())
    assert info.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - start < 5


def test_a_send_waits_for_room_until_systemd_reads(deaf_systemd) -> None:
    fill_queue(deaf_systemd)
    import threading

    def drain_later() -> None:
        time.sleep(0.3)
        for _ in range(3):
            deaf_systemd.receive()

    reader = threading.Thread(target=drain_later)
    reader.start()
    try:
        assert systemd.notify("READY=1", timeout=30, environ=deaf_systemd.env()) is True
    finally:
        reader.join()


@pytest.mark.parametrize("timeout", [math.nan, -1, "5", None, True])
def test_bad_timeouts_are_einval(deaf_systemd, timeout: Any) -> None:
    for call in (lambda: systemd.notify("X=1", timeout=timeout, environ=deaf_systemd.env()),
                 lambda: systemd.barrier(timeout=timeout, environ=deaf_systemd.env())):
        with pytest.raises(liveupdate.InvalidArgumentError):
            call()


def test_an_infinite_timeout_is_no_limit(deaf_systemd) -> None:
    assert systemd.notify("READY=1", timeout=math.inf, environ=deaf_systemd.env()) is True


def test_an_exception_without_errno_is_kept_as_it_is(deaf_systemd) -> None:
    with pytest.raises(OverflowError):
        systemd.notify("X=1", [2**40], environ=deaf_systemd.env())


# -- find_sessions: one bad fd does not hide the good ones -----------------


@pytest.fixture(params=["stopped service", "fake session socket"])
def bad_session_fd(request, tmp_path):
    if request.param == "stopped service":
        from liveupdate.service import testing as service_testing

        (tmp_path / "svc").mkdir()
        with service_testing.running_service(tmp_path / "svc") as path:
            dev = liveupdate.open(backend="service", emulator=path)
            session = dev.create_session("doomed")
            dev.close()
        fd = session.detach()  # the service is gone now: EPIPE on use
    else:
        from liveupdate.service import protocol

        # Named like a session socket of the service, connected to nothing.
        fake = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fake.bind(protocol.SESSION_NAME_PREFIX + b"fake-%d" % os.getpid())
        fd = fake.detach()
    yield fd
    os.close(fd)


def test_find_sessions_returns_the_good_and_reports_the_bad(bad_session_fd, caplog) -> None:
    emu = liveupdate.Emulator()
    with emu.open() as dev:
        good = dev.create_session("good")
    try:
        def work() -> Dict[str, Any]:
            found = systemd.find_sessions()
            still_open = os.fstat(3) is not None
            return {"found": sorted(found), "failed": {k: v.errno for k, v in found.failed.items()},
                    "bad_left_open": still_open}

        report = in_child_with_listen_fds([bad_session_fd, good.fileno()], ["bad", "good"], work)
        assert report.get("ok", {}).get("found") == ["good"], report
        assert list(report["ok"]["failed"]) == ["bad"]
        assert report["ok"]["failed"]["bad"] not in (None, errno.ENOTTY)
        assert report["ok"]["bad_left_open"] is True
    finally:
        good.close()


def test_find_sessions_reports_a_stale_emulated_handle() -> None:
    emu = liveupdate.Emulator()
    with emu.open() as dev:
        old = dev.create_session("old")
        new_name = "after"
    emu.kexec()
    with emu.open() as dev:
        fresh = dev.create_session(new_name)
    try:
        def work() -> Dict[str, Any]:
            found = systemd.find_sessions()
            return {"found": sorted(found), "failed": {k: v.errno for k, v in found.failed.items()}}

        report = in_child_with_listen_fds([old.fileno(), fresh.fileno()], ["old", "new"], work)
        assert report == {"ok": {"found": ["new"], "failed": {"old": errno.ESTALE}}}
    finally:
        old.close()
        fresh.close()


# -- listen_fds on lies ---------------------------------------------------


def _cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


@pytest.mark.parametrize("names", ["only-one", None])
def test_passed_fds_are_cloexec_even_when_the_names_are_wrong(names) -> None:
    a, b = os.memfd_create("a", 0), os.memfd_create("b", 0)
    try:
        def work() -> Dict[str, Any]:
            if names is not None:
                os.environ["LISTEN_FDNAMES"] = names
            try:
                systemd.listen_fds()
                outcome = "ok"
            except OSError as exc:
                outcome = errno.errorcode[exc.errno]
            return {"outcome": outcome, "cloexec": [_cloexec(3), _cloexec(4)]}

        report = in_child_with_listen_fds([a, b], None, work)
        expected = "EINVAL" if names is not None else "ok"
        assert report == {"ok": {"outcome": expected, "cloexec": [True, True]}}
    finally:
        os.close(a)
        os.close(b)


def test_passed_fds_are_cloexec_even_when_one_is_closed() -> None:
    a = os.memfd_create("a", 0)
    try:
        def work() -> Dict[str, Any]:
            for fd in (4, 5):  # whatever the test process had there
                try:
                    os.close(fd)
                except OSError:
                    pass
            os.environ["LISTEN_FDS"] = "3"
            os.environ["LISTEN_FDNAMES"] = "a:b:c"
            try:
                systemd.listen_fds()
                outcome = "ok"
            except OSError as exc:
                outcome = errno.errorcode[exc.errno]
            return {"outcome": outcome, "cloexec": _cloexec(3)}

        report = in_child_with_listen_fds([a], None, work)
        assert report == {"ok": {"outcome": "EBADF", "cloexec": True}}
    finally:
        os.close(a)


def test_zero_fds_with_empty_names_is_none() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert systemd.listen_fds(environ=env) == []


@pytest.mark.parametrize("key,value", [
    ("LISTEN_FDS", "99999999999999"),
    ("LISTEN_FDS", "\u00b2"),            # a superscript two: str.isdigit() says yes
    ("LISTEN_FDS", "1" * 5000),
    ("LISTEN_FDS", "-1"),
    ("LISTEN_FDS", " 1"),
    ("LISTEN_PID", "\u0661\u0662"),      # Arabic-Indic digits
    ("LISTEN_PID", "9" * 5000),
], ids=["huge", "superscript", "5000-digits", "negative", "space", "arabic-pid", "5000-digit-pid"])
def test_lying_counts_are_einval(key: str, value: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    env[key] = value
    with pytest.raises(liveupdate.InvalidArgumentError) as info:
        systemd.listen_fds(environ=env)
    assert key in str(info.value)
    assert len(str(info.value)) < 400


def test_fdstore_count_of_superscript_digits_is_no_store(tmp_path) -> None:
    path = str(tmp_path / "n")
    fake = FakeNotify(path, path)
    try:
        with pytest.raises(OSError) as info:
            systemd.store_fd(0, "x", environ={"NOTIFY_SOCKET": path, "FDSTORE": "\u00b2"})
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as info:
            systemd.store_fd(0, "x", environ={"NOTIFY_SOCKET": path, "FDSTORE": "9" * 5000})
        assert info.value.errno == errno.ENOSPC
    finally:
        fake.close()


# -- what Session.from_fd tells of a session it adopts ---------------------


@pytest.fixture(params=["emulator", "service"])
def opened(request, tmp_path):
    if request.param == "emulator":
        emu = liveupdate.Emulator()
        yield emu.open, emu.kexec
    else:
        from liveupdate.service import client, testing as service_testing

        (tmp_path / "s").mkdir()
        with service_testing.running_service(tmp_path / "s") as path:
            yield (lambda: liveupdate.open(backend="service", emulator=path)), (lambda: client.kexec(path))


def test_from_fd_tells_outgoing_from_incoming_without_changing_anything(opened) -> None:
    open_device, kexec = opened
    with open_device() as dev:
        session = dev.create_session("told")
    memfd = os.memfd_create("data")
    os.write(memfd, b"kept")
    session.preserve(memfd, 5)
    adopted = liveupdate.Session.from_fd(os.dup(session.fileno()))
    assert adopted.state == "outgoing"
    adopted.close()
    # The probe preserved nothing and took no token.
    other = os.memfd_create("other")
    session.preserve(other, 0)
    kexec()
    session.close()
    with open_device() as dev:
        incoming = dev.retrieve_session("told")
    adopted = liveupdate.Session.from_fd(os.dup(incoming.fileno()))
    assert adopted.state == "incoming"
    # ... and did not finish it: the files are still there.
    assert os.pread(adopted.retrieve(5), 10, 0) == b"kept"
    adopted.close()
    incoming.finish()
    incoming.close()
    os.close(memfd)
    os.close(other)
