"""The service's budgets: one client cannot take the memory or the fds that
the others need, gets the kernel's errno when it tries, and what it held
comes back when the kernel lets go of it. And a long kernel call does not
stop the service for the others."""
from __future__ import annotations

import errno
import os
import resource
import sys
import threading
from typing import Any, Dict, Iterator, List

import pytest

import liveupdate
from liveupdate import _abi
from liveupdate.service import budget, paths
from liveupdate.service import requests as service_requests
from liveupdate.service import testing
from liveupdate.service.kernel import Kernel
from liveupdate.service.server import Server

from .conftest import wait_child

MiB = 1 << 20


def _sparse(size: int) -> int:
    fd = os.memfd_create("budget")
    os.ftruncate(fd, size)
    return fd


def _cost(size: int) -> int:
    fd = _sparse(size)
    try:
        return budget.held_bytes(os.fstat(fd))
    finally:
        os.close(fd)


def _preserve_sparse(session: Any, size: int, token: int) -> None:
    fd = _sparse(size)
    try:
        session.preserve(fd, token)
    finally:
        os.close(fd)


def _used(service: testing.ServiceProcess) -> Dict[str, Any]:
    return service.status()["budget"]


def _in_child(work) -> int:
    """Run ``work()`` in a forked child (another client: another pid);
    its exit code is 0 when it returned, else the errno it raised (or 99)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            work()
        except OSError as exc:
            code = exc.errno or 99
        except BaseException:
            code = 99
        os._exit(code)
    return wait_child(pid)


SMALL = 4 * MiB
#: A client's memory budget in these tests: three small files (whatever the
#: emulator's cost per page, see budget.held_bytes), and 4.5 of them in all.
UNIT = _cost(SMALL)


@pytest.fixture
def small_budget(tmp_path) -> Iterator[testing.ServiceProcess]:
    svc = testing.ServiceProcess(tmp_path, extra_args=["--memory-per-client", str(3 * UNIT),
                                                       "--memory-total", str(9 * UNIT // 2)])
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_a_client_past_its_memory_budget_gets_enomem_and_the_others_go_on(small_budget):
    big, small = _sparse(64 * MiB), _sparse(SMALL)
    assert _cost(64 * MiB) > 3 * UNIT
    try:
        with small_budget.open() as dev:
            session = dev.create_session("greedy")
        session.preserve(small, 1)
        with pytest.raises(OSError) as refused:
            session.preserve(big, 2)
        assert refused.value.errno == errno.ENOMEM
        assert "budget" in str(refused.value)
        assert _used(small_budget)["memory"] == UNIT

        def other_client() -> None:
            with small_budget.open() as other:
                theirs = other.create_session("modest")
            _preserve_sparse(theirs, SMALL, 1)
            _preserve_sparse(theirs, SMALL, 2)
            theirs.close()

        assert _in_child(other_client) == 0
        # Closing the session unpreserves its file: its memory comes back.
        session.close()
        assert _used(small_budget)["memory"] == 0
        with small_budget.open() as dev:
            again = dev.create_session("greedy")
        for token in range(3):  # the whole budget, once the first file is gone
            _preserve_sparse(again, SMALL, token)
        again.close()
    finally:
        os.close(big)
        os.close(small)


def test_the_service_total_bounds_all_clients_together(small_budget):
    # Each client may hold 3 units, all of them together 4.5.
    with small_budget.open() as dev:
        mine = dev.create_session("first")
    _preserve_sparse(mine, SMALL, 1)
    _preserve_sparse(mine, SMALL, 2)

    def second_client() -> None:
        with small_budget.open() as other:
            theirs = other.create_session("second")
        for token in range(3):
            _preserve_sparse(theirs, SMALL, token)

    assert _in_child(second_client) == errno.ENOMEM
    mine.close()
    assert _in_child(second_client) == 0


def test_memory_follows_the_files_across_a_kexec_until_retrieved_or_finished(small_budget):
    with small_budget.open() as dev:
        kept = dev.create_session("kept")
        dropped = dev.create_session("dropped")
    for token in (1, 2):
        _preserve_sparse(kept, SMALL, token)
    _preserve_sparse(dropped, SMALL, 1)
    before = _used(small_budget)["memory"]
    assert before == 3 * UNIT
    small_budget.kexec()
    kept.close()
    dropped.close()
    assert _used(small_budget)["memory"] == before  # the memory crossed with the sessions
    with small_budget.open() as dev:
        incoming = dev.retrieve_session("kept")
    os.close(incoming.retrieve(1))
    assert _used(small_budget)["memory"] == 2 * UNIT
    incoming.finish()
    incoming.close()
    assert _used(small_budget)["memory"] == UNIT  # "dropped", never retrieved
    small_budget.kexec()  # ... which the next kernel does not get
    assert _used(small_budget)["memory"] == 0


@pytest.fixture
def fd_budget(tmp_path) -> Iterator[testing.ServiceProcess]:
    svc = testing.ServiceProcess(tmp_path, extra_args=["--fds-per-client", "20", "--fds-total", "50"])
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_a_client_past_its_fd_share_gets_emfile_and_the_others_go_on(fd_budget):
    small_budget = fd_budget
    # 20 fds a client: its connection (1) and device (2), then 3 a session.
    dev = small_budget.open()
    sessions: List[liveupdate.Session] = []
    with pytest.raises(OSError) as refused:
        for i in range(20):
            sessions.append(dev.create_session(f"s{i}"))
    assert refused.value.errno == errno.EMFILE
    assert len(sessions) == (20 - 3) // 3
    dev.close()

    def other_client() -> None:
        with small_budget.open() as other:
            for i in range(5):
                other.create_session(f"other{i}").close()

    assert _in_child(other_client) == 0
    # A preserved file costs the service an fd as well: 15 held, 5 to go.
    files = [_sparse(4096) for _ in range(6)]
    for token, fd in enumerate(files[:5]):
        sessions[0].preserve(fd, token)
    with pytest.raises(OSError) as no_fd:
        sessions[0].preserve(files[5], 5)
    assert no_fd.value.errno == errno.EMFILE
    for fd in files:
        os.close(fd)
    for session in sessions:
        session.close()
    assert _used(small_budget)["fds"] == budget.FDS_PER_CONNECTION  # the status request's own
    with small_budget.open() as dev:
        dev.create_session("again").close()


def test_past_the_service_total_a_client_gets_enfile(tmp_path):
    # 40 fds in all, 20 a client: two clients holding 15 each leave 10.
    svc = testing.ServiceProcess(tmp_path, extra_args=["--fds-per-client", "20", "--fds-total", "40"]).start()

    def hog(tag: str, keep: List[Any]) -> None:
        with svc.open() as dev:
            with pytest.raises(OSError) as full:
                for i in range(20):
                    keep.append(dev.create_session(f"{tag}{i}"))
            assert full.value.errno == errno.EMFILE

    held: List[Any] = []
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    try:
        hog("a", held)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the second client holds its sessions until told
            code = 1
            try:
                keep: List[Any] = []
                hog("b", keep)
                os.write(ready_w, b"x")
                os.read(done_r, 1)
                code = 0
            finally:
                os._exit(code)
        try:
            assert os.read(ready_r, 1) == b"x"
            assert _used(svc)["fds"] == 30 + budget.FDS_PER_CONNECTION  # and the status request's
            # A third: connection 1, device 2, sessions 3 each: the third
            # session would take the service to 42.
            assert _in_child(lambda: [svc.open().create_session(f"c{i}") for i in range(3)]) == errno.ENFILE
        finally:
            os.write(done_w, b"x")
            wait_child(pid)
    finally:
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
        for item in held:
            item.close()
        svc.stop()


def test_the_service_raises_its_soft_fd_limit_and_derives_its_budget(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip("needs a finite hard RLIMIT_NOFILE of at least 512")

    class LowSoftLimit(testing.ServiceProcess):
        # The service starts with a soft limit of 256 (lowered in its own
        # process only: this one may hold more fds than that).
        def command(self) -> List[str]:
            argv = super().command()
            lower = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, "
                     f"{hard})); os.execv(sys.executable, sys.argv[1:])")
            return [argv[0], "-c", lower, *argv]

    svc = LowSoftLimit(tmp_path).start()
    try:
        with open(f"/proc/{svc.pid}/limits") as fh:
            line = next(line for line in fh if line.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)]
        limits = _used(svc)["limits"]
        assert limits["fds_total"] == hard - budget.FD_HEADROOM
        assert limits["fds_per_client"] == limits["fds_total"] // 2
        assert 0 < limits["memory_per_client"] <= limits["memory_total"]
    finally:
        svc.stop()


def test_bad_budgets_are_refused_in_one_line(tmp_path, capsys):
    from liveupdate import cli

    with pytest.raises(SystemExit):
        cli.main(["emulator", "serve", "--socket", str(tmp_path / "s.sock"), "--memory-total", "lots"])
    assert "not a size" in capsys.readouterr().err
    code = cli.main(["emulator", "serve", "--socket", str(tmp_path / "s.sock"),
                     "--memory-per-client", "2G", "--memory-total", "1G"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "exceeds the total" in err, err
    assert not os.path.exists(tmp_path / "s.sock")


# -- a long kernel call -------------------------------------------------------------


class _Gate:
    """Holds the big preserve at the port until the test lets it go."""

    entered = threading.Event()
    release = threading.Event()


def _pausing_emulator_class() -> Any:
    from liveupdate.emulator import Emulator

    class PausingPort:
        def __init__(self, port: Any) -> None:
            self._port = port

        def __getattr__(self, name: str) -> Any:
            return getattr(self._port, name)

        def ioctl(self, fd: int, cmd: int, arg: bytes) -> bytes:
            if cmd & 0xFFFFFFFF == _abi.SESSION_PRESERVE_FD and service_requests.token_of(arg) == 7:
                _Gate.entered.set()
                if not _Gate.release.wait(120):
                    raise OSError(errno.ETIMEDOUT, "the test never let the preserve go")
            return self._port.ioctl(fd, cmd, arg)

    class PausingEmulator(Emulator):
        def __init__(self) -> None:
            super().__init__()
            self.port = PausingPort(self.port)

    return PausingEmulator


def test_other_clients_are_served_while_a_long_preserve_runs(tmp_path, monkeypatch, actors):
    # The service hands a call that makes the kernel hold more than
    # LONG_CALL_BYTES to its worker thread; here the preserve of token 7
    # is held at the port until the other client has been served.
    monkeypatch.setattr(service_requests, "LONG_CALL_BYTES", UNIT)
    _Gate.entered.clear()
    _Gate.release.clear()
    path = str(tmp_path / "svc.sock")
    listener = paths.bind_listener(path)
    server = Server(Kernel(emulator_class=_pausing_emulator_class()), listener, {os.geteuid(), 0})
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    outcome: List[Any] = []
    big = _sparse(64 * MiB)
    try:
        with liveupdate.open(emulator=path, timeout=120) as dev:
            session = dev.create_session("large")

        def preserve() -> None:
            try:
                session.preserve(big, 7)
                outcome.append("preserved")
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=preserve, daemon=True)
        caller.start()
        assert _Gate.entered.wait(60), "the preserve never reached the kernel"
        # Another process: open, create, preserve three memfds, get its name.
        other = actors(path, "daemon", "small", 3)
        report = other.read(timeout=60)
        assert report["ready"] is True
        assert not outcome, "the big preserve finished before it was let go"
        _Gate.release.set()
        caller.join(60)
        assert outcome == ["preserved"]
        assert other.finish() == 0
        session.close()
    finally:
        _Gate.release.set()
        server.stop()
        loop.join(60)
        listener.close()
        os.close(big)
        try:
            os.unlink(path)
        except OSError:
            pass


def test_a_session_released_on_the_worker_is_gone_before_the_next_call(service):
    # Files past LONG_CALL_BYTES make the release a long call (run on the
    # worker): the next create of the same name, and a preserve of the same
    # files, must still see the session gone, as after close() on the kernel.
    size = 128 * MiB
    fds = [_sparse(size) for _ in range(3)]
    assert 3 * _cost(size) > service_requests.LONG_CALL_BYTES
    try:
        with service.open() as dev:
            for round_ in range(3):
                session = dev.create_session("released")
                for token, fd in enumerate(fds):
                    session.preserve(fd, token)
                session.close()
    finally:
        for fd in fds:
            os.close(fd)


def test_a_malformed_struct_gets_the_kernels_errno_not_the_budgets(tmp_path):
    # The kernel checks the struct's size before it reserves an fd: a client
    # at its fd share still gets EINVAL for a size below the struct's.
    svc = testing.ServiceProcess(tmp_path, extra_args=["--fds-per-client", "3"]).start()
    try:
        with svc.open() as dev:  # connection 1 + device 2: the whole share
            port = liveupdate.service.port_for(svc.socket)
            short = (4).to_bytes(4, sys.byteorder) + bytes(4 + _abi.NAME_LENGTH)
            with pytest.raises(OSError) as bad:
                port.ioctl(dev.fileno(), _abi.IOCTL_CREATE_SESSION, short)
            assert bad.value.errno == errno.EINVAL
            with pytest.raises(OSError) as full:
                dev.create_session("fine")
            assert full.value.errno == errno.EMFILE
    finally:
        svc.stop()


def test_a_file_the_kernel_refuses_gets_the_kernels_errno_at_a_full_share(tmp_path):
    # connection 1 + device 2 + session 3: the share is full; a preserve the
    # kernel refuses anyway costs nothing and gets the kernel's answer.
    svc = testing.ServiceProcess(tmp_path, extra_args=["--fds-per-client", "6"]).start()
    plain = tmp_path / "plain"
    plain.write_bytes(b"on disk, not a memfd")
    try:
        with svc.open() as dev:
            session = dev.create_session("full")
            with open(plain, "rb") as fh, pytest.raises(OSError) as foreign:
                session.preserve(fh.fileno(), 1)
            assert foreign.value.errno == errno.ENOENT
            fd = _sparse(4096)
            os.close(fd)
            with pytest.raises(OSError) as closed:
                session.preserve(fd, 2)
            assert closed.value.errno == errno.EBADF
            memfd = _sparse(4096)
            try:
                with pytest.raises(OSError) as full:
                    session.preserve(memfd, 3)
                assert full.value.errno == errno.EMFILE
            finally:
                os.close(memfd)
            session.close()
    finally:
        svc.stop()


def test_a_token_used_again_gets_eexist_even_at_a_full_budget(small_budget):
    # luo_preserve_file() checks the token before it pins a page: EEXIST,
    # not the budget's ENOMEM or EMFILE.
    files = [_sparse(SMALL) for _ in range(4)]
    try:
        with small_budget.open() as dev:
            session = dev.create_session("full")
        for token in range(3):
            session.preserve(files[token], token)
        with pytest.raises(OSError) as over:
            session.preserve(files[3], 3)
        assert over.value.errno == errno.ENOMEM
        with pytest.raises(OSError) as again:
            session.preserve(files[3], 1)
        assert again.value.errno == errno.EEXIST
        session.close()
    finally:
        for fd in files:
            os.close(fd)
