"""liveupdate.systemd.carry_session: a session's files through more than
one kexec, and nothing lost whenever the process dies.

A stand-in for systemd's fd store (tests/tools/fake_fdstore.py, with the
behaviour measured on systemd 262.1) holds what the "service" stores; the
service runs as forked children (each start a new process, as systemd
starts it), on the emulator service, whose kexec the test drives."""
from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

import liveupdate
from liveupdate import systemd
from liveupdate.service import client as service_client

from . import child_report
from .fake_fdstore import FakeFdStore

FILES = {1: b"first file " * 300, 9: b"ninth"}
KERNEL_NAME = "cache-sess"


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    from liveupdate.service import testing as service_testing

    with service_testing.running_service(tmp_path_factory.mktemp("carry-service")) as path:
        yield path


@pytest.fixture
def store(tmp_path) -> Iterator[FakeFdStore]:
    fake = FakeFdStore(str(tmp_path / "notify"), capacity=8)
    yield fake
    fake.close()


def start(store: FakeFdStore, service: str, work: Callable[[], Any]) -> Dict[str, Any]:
    """One start of the service: a child with the store's fds as LISTEN_FDS."""
    fds, names = store.listen()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        out = fcntl.fcntl(write_end, fcntl.F_DUPFD, 300)
        try:
            sources = [fcntl.fcntl(fd, fcntl.F_DUPFD, 301) for fd in fds]
            for offset, source in enumerate(sources):
                os.dup2(source, 3 + offset, inheritable=True)
                os.close(source)
            os.environ.update(store.env())
            os.environ.update({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(fds)),
                               "LISTEN_FDNAMES": ":".join(names), "LIVEUPDATE_EMULATOR": service,
                               # where /dev/liveupdate exists (the VM tier), auto would take it
                               "LIVEUPDATE_BACKEND": "service"})
            result: Dict[str, Any] = {"ok": work()}
        except BaseException as exc:
            result = {"error": f"{type(exc).__name__}: {exc}", "errno": getattr(exc, "errno", None)}
        os.write(out, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    try:
        return child_report.collect(read_end, pid)
    except ValueError:  # the child died without a word, as planned
        return {"died": True}


def first_start() -> str:
    with liveupdate.open() as dev:
        session = dev.create_session(KERNEL_NAME)
    for token, data in FILES.items():
        fd = os.memfd_create(f"file{token}")
        os.write(fd, data)
        session.preserve(fd, token)
        os.close(fd)
    systemd.store_session(session, "cache")
    systemd.barrier()
    return session.state


def every_start() -> Dict[str, Any]:
    """What the docs tell a service to do on every start."""
    found = systemd.find_sessions()
    session = found.get("cache")
    if "cache" in found.unfinished or (session is not None and session.state == "incoming"):
        carried = systemd.carry_session(session, list(FILES), name="cache")
        data = {str(t): os.pread(fd, 1 << 20, 0).decode() for t, fd in carried.fds.items()}
        carried.close()
        return {"did": "carried", "state": carried.session.state, "data": data}
    if session is None:
        return {"did": "nothing to carry"}
    return {"did": "restarted", "state": session.state}


def kexec(store: FakeFdStore, service: str) -> None:
    def retrieve(kernel_name: bytes) -> Optional[int]:
        with liveupdate.open(backend="service", emulator=service) as dev:
            try:
                return dev.retrieve_session(kernel_name).detach()
            except FileNotFoundError:
                return None  # not handed over: systemd drops the entry

    store.kexec(lambda: service_client.kexec(service), retrieve)


def expected_data() -> Dict[str, str]:
    return {str(t): d.decode() for t, d in FILES.items()}


def test_files_reach_a_third_kernel(store, service) -> None:
    assert start(store, service, first_start) == {"ok": "outgoing"}
    assert start(store, service, every_start) == {"ok": {"did": "restarted", "state": "outgoing"}}
    kexec(store, service)
    assert start(store, service, every_start) == {"ok": {"did": "carried", "state": "outgoing",
                                                         "data": expected_data()}}
    assert store.names() == ["cache"]  # nothing parked is left behind
    kexec(store, service)
    assert start(store, service, every_start)["ok"]["data"] == expected_data()
    kexec(store, service)
    assert start(store, service, every_start)["ok"]["data"] == expected_data()


def test_without_carrying_the_second_kexec_loses_the_session(store, service) -> None:
    start(store, service, first_start)
    kexec(store, service)
    assert store.names() == ["cache"]
    kexec(store, service)  # the incoming session is not handed over again
    assert store.names() == []


# The calls that change something, in the order carry_session makes them.
WATCHED = [
    ("liveupdate.systemd.carry", "store_fd"),
    ("liveupdate.systemd.carry", "remove_fd"),
    ("liveupdate.systemd.carry", "barrier"),
    ("liveupdate.session", "Session.finish"),
    ("liveupdate.session", "Session.preserve"),
    ("liveupdate.device", "Device.create_session"),
]


def dying_after(calls: int) -> Callable[[], Any]:
    """every_start, in a process that dies (os._exit) right after its
    ``calls``-th watched call; it returns normally if it makes fewer."""

    def work() -> Any:
        import importlib

        count = [0]
        for module_name, attr in WATCHED:
            module = importlib.import_module(module_name)
            owner: Any = module
            *path, leaf = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, leaf)

            def wrapper(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
                result = __original(*args, **kwargs)
                count[0] += 1
                if count[0] == calls:
                    os._exit(17)
                return result

            setattr(owner, leaf, wrapper)
        return every_start()

    return work


def test_a_death_at_any_step_loses_nothing(store, service) -> None:
    start(store, service, first_start)
    kexec(store, service)
    deaths = 0
    for calls in range(1, 100):
        before = store.names()
        report = start(store, service, dying_after(calls))
        if "ok" in report:
            break  # the carry ran to its end before this many calls
        deaths += 1
        # The restarted service finishes the carry from whatever is left:
        # it carries the files, or finds the new session in place (a death
        # after it was stored, during the clean-up).
        after = start(store, service, every_start)
        assert after.get("ok", {}).get("data") == expected_data() or \
            after.get("ok") == {"did": "restarted", "state": "outgoing"}, (calls, before, store.names(), after)
        # Either way the files are in the next kernel, carried again there,
        # and nothing parked is left once that carry is done.
        kexec(store, service)
        again = start(store, service, every_start)
        assert again["ok"]["data"] == expected_data(), (calls, again)
        assert store.names() == ["cache"], (calls, store.names())
        kexec(store, service)  # the next round starts where this one did
    else:  # pragma: no cover
        pytest.fail("carry_session never finished")
    assert report["ok"]["data"] == expected_data()
    assert deaths >= 8  # every step of the carry had its death


def test_an_outgoing_session_needs_no_carry(store, service) -> None:
    start(store, service, first_start)

    def work() -> Any:
        session = systemd.find_sessions()["cache"]
        systemd.carry_session(session, list(FILES), name="cache")

    report = start(store, service, work)
    assert report["errno"] == errno.EINVAL and "outgoing" in report["error"]


def test_a_store_too_small_to_park_the_files(store, service) -> None:
    start(store, service, first_start)
    kexec(store, service)
    store.capacity = 2

    def work() -> Any:
        session = systemd.find_sessions()["cache"]
        systemd.carry_session(session, list(FILES), name="cache")

    report = start(store, service, work)
    assert report["errno"] == errno.ENOSPC and "FileDescriptorStoreMax" in report["error"]
    store.capacity = 8
    assert start(store, service, every_start)["ok"]["data"] == expected_data()  # nothing was touched


def test_nothing_to_carry_is_enoent(store, service) -> None:
    def work() -> Any:
        systemd.carry_session(None, [1], name="cache")

    report = start(store, service, work)
    assert report["errno"] == errno.ENOENT


def test_without_systemd_on_the_in_process_emulator() -> None:
    emu = liveupdate.Emulator()
    with emu.open() as dev:
        session = dev.create_session("plain")
        fd = os.memfd_create("f")
        os.write(fd, b"no systemd here")
        session.preserve(fd, 3)
        os.close(fd)
    for _ in range(3):
        emu.kexec()
        session.close()  # stale now
        with emu.open() as dev:
            incoming = dev.retrieve_session("plain")
            carried = systemd.carry_session(incoming, [3], name="plain", store=False, device=dev)
        assert os.pread(carried.fds[3], 100, 0) == b"no systemd here"
        assert incoming.closed and carried.session.state == "outgoing"
        carried.close()
        session = carried.session
    session.close()


def test_bad_arguments() -> None:
    with pytest.raises(liveupdate.InvalidArgumentError):
        systemd.carry_session(None, [1], name="a:b", environ={})
    with pytest.raises(liveupdate.InvalidArgumentError):
        systemd.carry_session(None, [-1], name="ok", environ={})
    with pytest.raises(liveupdate.InvalidArgumentError):
        systemd.carry_session(None, [1], name="ok", timeout=float("nan"), environ={})
    with pytest.raises(OSError) as info:
        systemd.carry_session(None, [1], name="ok", environ={})
    assert info.value.errno == errno.ENXIO
