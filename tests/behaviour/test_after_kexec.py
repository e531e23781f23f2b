"""Incoming sessions: what the next kernel hands back and how it lets go.

Written as two-stage live update tests (the ``liveupdate_kexec`` fixture of
:mod:`liveupdate.testing`): on the emulator both stages run in one test; on
a real kernel in a VM (``tools/vmtest --kexec -- python3 -m pytest
tests/behaviour``) stage 1 runs, the machine kexecs, and stage 2 runs in the
new kernel. Every session name is used by one test only, since all of them
cross the same kexec together.

The expectations are the kernel's: luo_session_retrieve(),
luo_retrieve_file(), luo_file_finish(), luo_session_release() and
memfd_luo_retrieve(). The last two tests need two kexecs in a row, which
only the emulator does inside one test.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
from typing import Any, Callable, Dict, Iterator

import pytest

from liveupdate import _abi

from .helpers import close_quietly, contents, is_cloexec, raises_errno, raw_ioctl, same_file

PAGE = os.sysconf("SC_PAGE_SIZE")


def stage1(lk: Any, name: str, files: Dict[int, bytes] = {}, dev: Any = None) -> Any:
    """Create session ``name`` holding a new memfd per token (our fds closed
    right away, as the selftests' create_and_preserve_memfd() does), kept
    open through the kexec. Opens the device unless ``dev`` is given."""
    session = lk.keep((dev or lk.open()).create_session(name))
    preserve_files(session, files)
    return session


def preserve_files(session: Any, files: Dict[int, bytes]) -> None:
    """Preserve a new memfd per token holding its bytes; our fds are closed
    right away, so the session alone keeps the files."""
    for token, data in files.items():
        fd = os.memfd_create(f"file-{token}")
        try:
            if data:
                os.write(fd, data)
            session.preserve(fd, token)
        finally:
            os.close(fd)


@pytest.fixture
def fds(cleanup: Any) -> Callable[[int], int]:
    """``fds(fd)`` closes ``fd`` at teardown and returns it."""

    def push(fd: int) -> int:
        cleanup.callback(close_quietly, fd)
        return fd

    return push


def test_contents_come_back(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-simple", {0x1A: b"hello kexec world"})
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-simple"))
    assert contents(fds(session.retrieve(0x1A))) == b"hello kexec world"
    session.finish()


def test_retrieved_fds_are_cloexec(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-cloexec", {1: b"x"})
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-cloexec"))
    assert is_cloexec(session.fileno())
    assert is_cloexec(fds(session.retrieve(1)))


def test_repeated_retrieve_gives_another_fd_of_the_same_file(liveupdate_kexec: Any, track: Callable,
                                                             fds: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-again", {5: b"0123456789"})
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-again"))
    first = fds(session.retrieve(5))
    second = fds(session.retrieve(5))
    assert first != second
    assert same_file(first, second)
    # One struct file behind both fds: they share the offset.
    os.lseek(first, 7, os.SEEK_SET)
    assert os.lseek(second, 0, os.SEEK_CUR) == 7
    os.pwrite(first, b"AB", 0)
    assert contents(second) == b"AB23456789"


def test_unknown_token_is_enoent(liveupdate_kexec: Any, track: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        dev = lk.open()
        stage1(lk, "kxb-tokens", {1: b"a"}, dev)
        stage1(lk, "kxb-no-files", {}, dev)
        lk.kexec()
    dev = lk.open()
    with_files = track(dev.retrieve_session("kxb-tokens"))
    without = track(dev.retrieve_session("kxb-no-files"))
    with raises_errno(errno.ENOENT):
        with_files.retrieve(2)
    with raises_errno(errno.ENOENT):
        without.retrieve(1)


def test_second_retrieve_of_a_session_is_einval(liveupdate_kexec: Any, track: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-once")
        lk.kexec()
    dev = lk.open()
    track(dev.retrieve_session("kxb-once"))
    with raises_errno(errno.EINVAL):
        track(dev.retrieve_session("kxb-once"))


def test_preserve_on_incoming_is_einval(liveupdate_kexec: Any, track: Callable, memfd: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-incoming-preserve")
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-incoming-preserve"))
    with raises_errno(errno.EINVAL):
        session.preserve(memfd(), 1)


def test_get_name_on_incoming(liveupdate_kexec: Any, track: Callable) -> None:
    lk = liveupdate_kexec
    name = "kxb-é-" + "n" * 54  # 62 bytes
    if lk.stage == 1:
        stage1(lk, name)
        lk.kexec()
    assert track(lk.open().retrieve_session(name)).name == name


def test_finish_releases_everything(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-finish-all", {1: b"retrieved", 2: b"never retrieved"})
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-finish-all"))
    fd = fds(session.retrieve(1))
    session.finish()
    # The kernel dropped its files: no token is known any more...
    with raises_errno(errno.ENOENT):
        session.retrieve(1)
    with raises_errno(errno.ENOENT):
        session.retrieve(2)
    # ...but the fd the caller holds is the caller's.
    assert contents(fd) == b"retrieved"
    # Finishing again has nothing left to do.
    session.finish()


def test_finished_session_stays_until_closed(liveupdate_kexec: Any) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-finished-open")
        lk.kexec()
    dev = lk.open()
    session = dev.retrieve_session("kxb-finished-open")
    try:
        session.finish()
        with raises_errno(errno.EINVAL):
            dev.retrieve_session("kxb-finished-open").close()
    finally:
        session.close()
    with raises_errno(errno.ENOENT):
        dev.retrieve_session("kxb-finished-open").close()


def test_closing_incoming_session_finishes_it(liveupdate_kexec: Any, track: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-close-finishes", {1: b"x"})
        lk.kexec()
    dev = lk.open()
    dev.retrieve_session("kxb-close-finishes").close()
    with raises_errno(errno.ENOENT):
        track(dev.retrieve_session("kxb-close-finishes"))


def test_retrieved_file_is_busy_until_finish(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    # luo_retrieve_file() enters the new file in the preserved-files table;
    # only finish takes it out.
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-busy-until-finish", {1: b"payload"})
        lk.kexec()
    dev = lk.open()
    incoming = track(dev.retrieve_session("kxb-busy-until-finish"))
    fd = fds(incoming.retrieve(1))
    outgoing = track(dev.create_session("kxb-next-round"))
    with raises_errno(errno.EBUSY):
        outgoing.preserve(fd, 1)
    incoming.finish()
    outgoing.preserve(fd, 1)


def test_outgoing_may_reuse_an_incoming_name(liveupdate_kexec: Any, track: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-same-name")
        lk.kexec()
    dev = lk.open()
    track(dev.create_session("kxb-same-name"))
    track(dev.retrieve_session("kxb-same-name"))


def test_finish_raw_with_nonzero_reserved_is_einval(liveupdate_kexec: Any, track: Callable,
                                                   fds: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-finish-reserved", {1: b"x"})
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-finish-reserved"))
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_FINISH, _abi.FINISH.pack(_abi.FINISH.size, 1))
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_FINISH, _abi.FINISH.pack(4, 0))
    # Nothing was finished by the refused calls.
    fds(session.retrieve(1))


def test_retrieve_fd_raw_short_size_is_einval(liveupdate_kexec: Any, track: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-retrieve-short", {1: b"x"})
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-retrieve-short"))
    with raises_errno(errno.EINVAL):
        raw_ioctl(session, _abi.SESSION_RETRIEVE_FD, _abi.RETRIEVE_FD.pack(12, -1, 1))


def test_memfd_state_survives(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    lk = liveupdate_kexec
    size = 3 * PAGE + 17  # a hole, then a partial page
    if lk.stage == 1:
        session = stage1(lk, "kxb-memfd-state")
        fd = lk.keep(os.memfd_create("stateful", os.MFD_ALLOW_SEALING))
        os.write(fd, b"A" * 5000)
        os.ftruncate(fd, size)
        os.lseek(fd, 4321, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        lk.state["seals"] = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        session.preserve(fd, 9)
        # Written after preserve, within the size: the pages are the same ones.
        os.pwrite(fd, b"late", 100)
        # The position is taken at the kexec (memfd_luo_freeze()), not before.
        os.lseek(fd, 1234, os.SEEK_SET)
        lk.kexec()
    incoming = track(lk.open().retrieve_session("kxb-memfd-state"))
    new = fds(incoming.retrieve(9))
    assert os.fstat(new).st_size == size
    assert os.lseek(new, 0, os.SEEK_CUR) == 1234
    assert fcntl.fcntl(new, fcntl.F_GET_SEALS) == lk.state["seals"]
    expected = bytearray(b"A" * 5000 + bytes(size - 5000))
    expected[100:104] = b"late"
    assert os.pread(new, size + 10, 0) == bytes(expected)


def test_memfd_without_sealing_stays_unsealable(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    # A memfd made without MFD_ALLOW_SEALING carries F_SEAL_SEAL; the
    # retrieved file gets exactly the preserved seals back.
    lk = liveupdate_kexec
    probe = os.memfd_create("probe")
    try:
        seals = fcntl.fcntl(probe, fcntl.F_GET_SEALS)
    finally:
        os.close(probe)
    assert seals & fcntl.F_SEAL_SEAL
    if lk.stage == 1:
        stage1(lk, "kxb-seal-seal", {1: b"x"})
        lk.kexec()
    fd = fds(track(lk.open().retrieve_session("kxb-seal-seal")).retrieve(1))
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == seals
    with raises_errno(errno.EPERM):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)


def test_empty_memfd_survives(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-empty-file", {3: b""})
        lk.kexec()
    fd = fds(track(lk.open().retrieve_session("kxb-empty-file")).retrieve(3))
    assert os.fstat(fd).st_size == 0
    assert contents(fd) == b""
    os.write(fd, b"grows")  # an ordinary memfd again
    assert contents(fd) == b"grows"


@contextlib.contextmanager
def fd_limit(free: int) -> Iterator[None]:
    """Let the process open exactly ``free`` more fds (see test_fd_budget)."""
    lowest = os.dup(2)
    os.close(lowest)
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + free, saved[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_retrieve_costs_one_fd(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    # luo_ioctl_retrieve_session() and luo_session_retrieve_fd() each take
    # exactly one fd of the caller (get_unused_fd_flags()); the kernel's own
    # reference to the retrieved file takes none.
    lk = liveupdate_kexec
    if lk.stage == 1:
        stage1(lk, "kxb-fd-budget", {0: b"0", 1: b"1", 2: b"2"})
        lk.kexec()
    dev = lk.open()
    with fd_limit(1):
        session = dev.retrieve_session("kxb-fd-budget")
    track(session)
    got = []
    try:
        with fd_limit(3):
            for token in range(3):
                got.append(session.retrieve(token))
            with raises_errno(errno.EMFILE):
                got.append(session.retrieve(0))
    finally:
        for fd in got:
            fds(fd)


def test_an_adopted_session_knows_its_kind(liveupdate_kexec: Any, track: Callable, fds: Callable) -> None:
    # Session.from_fd asks with a command the kernel refuses either way
    # (EINVAL on an incoming session, E2BIG on an outgoing one), so the
    # answer changes nothing: the files are all there afterwards.
    from liveupdate import Session

    lk = liveupdate_kexec
    if lk.stage == 1:
        session = stage1(lk, "kxb-adopted-kind", {4: b"four"})
        adopted = Session.from_fd(os.dup(session.fileno()))
        assert adopted.state == "outgoing"
        adopted.close()
        lk.kexec()
    session = track(lk.open().retrieve_session("kxb-adopted-kind"))
    adopted = track(Session.from_fd(os.dup(session.fileno())))
    assert adopted.state == "incoming"
    assert adopted.name == "kxb-adopted-kind"
    fd = fds(adopted.retrieve(4))
    assert os.pread(fd, 4, 0) == b"four"
    adopted.close()
    session.finish()


# -- two kexecs in a row: the emulator only --------------------------------------

class Reboot:
    """Prepare sessions, kexec, reopen the device, as often as needed."""

    def __init__(self, backend: Any, kexec: Callable[[], None], cleanup: Any) -> None:
        self.backend = backend
        self._kexec = kexec
        self.cleanup = cleanup
        self.device = backend.open()
        self.outgoing: Dict[str, Any] = {}

    def session(self, name: str, files: Dict[int, bytes] = {}) -> Any:
        session = self.device.create_session(name)
        self.outgoing[name] = session
        preserve_files(session, files)
        return session

    def kexec(self) -> Any:
        self.device.close()
        self._kexec()
        for session in self.outgoing.values():
            try:
                session.close()  # a handle of the old kernel
            except OSError:
                pass
        self.outgoing.clear()
        self.device = self.backend.open()
        self.cleanup.callback(self.device.close)
        return self.device

    def fd(self, fd: int) -> int:
        self.cleanup.callback(close_quietly, fd)
        return fd


@pytest.fixture
def reboot(backend: Any, kexec: Callable, cleanup: Any) -> Reboot:
    return Reboot(backend, kexec, cleanup)


def test_unretrieved_sessions_are_gone_after_next_kexec(reboot: Reboot, track: Callable) -> None:
    reboot.session("left-behind", {1: b"x"})
    reboot.session("carried", {1: b"y"})
    dev = reboot.kexec()
    # Retrieved but not finished: also not handed on (only outgoing are).
    track(dev.retrieve_session("carried"))
    reboot.session("fresh", {1: b"z"})
    dev = reboot.kexec()
    for name in ("left-behind", "carried"):
        with raises_errno(errno.ENOENT):
            track(dev.retrieve_session(name))
    fresh = track(dev.retrieve_session("fresh"))
    assert contents(reboot.fd(fresh.retrieve(1))) == b"z"


def test_retrieved_file_can_be_carried_again(reboot: Reboot, track: Callable) -> None:
    reboot.session("round-1", {1: b"first kernel"})
    dev = reboot.kexec()
    incoming = track(dev.retrieve_session("round-1"))
    fd = reboot.fd(incoming.retrieve(1))
    os.pwrite(fd, b"FIRST", 0)
    incoming.finish()
    reboot.outgoing["round-2"] = outgoing = dev.create_session("round-2")
    outgoing.preserve(fd, 2)
    dev = reboot.kexec()
    again = track(dev.retrieve_session("round-2"))
    assert contents(reboot.fd(again.retrieve(2))) == b"FIRST kernel"
