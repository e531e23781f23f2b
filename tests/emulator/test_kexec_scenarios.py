"""The kernel's four kexec selftests through ``emu.kexec()``, and what else a
kexec must keep, drop and count.

tools/testing/selftests/liveupdate/{luo_kexec_simple,luo_multi_session,
luo_stress_files,luo_stress_sessions}.c run in two stages around a real
kexec: stage 1 preserves, forks a child that holds the session fds and
leaves; stage 2 (after the reboot) finds the stage in a "state" session,
retrieves, verifies and finishes. Here both stages run in one test, the
sessions held open by the test through the emulated kexec.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import resource
from typing import Any, Dict, Iterator, List, Optional

import pytest

import liveupdate
from liveupdate import KernelPanic, StaleHandleError
from liveupdate.emulator import Emulator

PAGE = mmap.PAGESIZE
F_SEAL_FUTURE_WRITE = 0x10  # not in every Python's fcntl


# -- the selftests' lib/lu_utils.c, in Python -----------------------------------

def create_and_preserve_memfd(session: Any, token: int, data: str) -> None:
    """A one-page memfd holding ``data`` (written through a shared mapping),
    preserved under ``token``; the fd is closed, only the kernel keeps it."""
    fd = os.memfd_create("test_mfd", 0)
    try:
        os.ftruncate(fd, PAGE)
        with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_WRITE) as m:
            m[: len(data) + 1] = data.encode() + b"\0"
        session.preserve(fd, token)
    finally:
        os.close(fd)


def restore_and_verify_memfd(session: Any, token: int, expected: Optional[str]) -> int:
    fd = session.retrieve(token)
    with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        text = m[:PAGE].split(b"\0", 1)[0].decode()
    if expected is not None:
        assert text == expected, f"token {token}: expected {expected!r}, got {text!r}"
    return fd


def create_state_file(dev: Any, name: str, token: int, next_stage: int) -> Any:
    session = dev.create_session(name)
    create_and_preserve_memfd(session, token, str(next_stage))
    return session  # kept open: closing it would unpreserve the state


def restore_and_read_stage(session: Any, token: int) -> int:
    fd = restore_and_verify_memfd(session, token, None)
    try:
        return int(os.read(fd, 31).split(b"\0", 1)[0])
    finally:
        os.close(fd)


class Machine:
    """One emulator and the luo_test() flow: stage detection, the "child"
    holding stage 1's sessions, the reboot."""

    def __init__(self) -> None:
        self.emu = Emulator()
        self.held: List[Any] = []

    def detect_stage(self, dev: Any, state: str) -> "tuple[int, Any]":
        try:
            return 2, dev.retrieve_session(state)
        except FileNotFoundError:
            return 1, None

    def hold(self, *sessions: Any) -> None:
        self.held.extend(sessions)

    def reboot(self) -> None:
        self.emu.kexec()
        for session in self.held:
            session.close()  # a stale handle: closing it is quiet
        self.held.clear()


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine()
    yield m
    for session in m.held:
        session.close()


@pytest.fixture
def nofile() -> Iterator[Any]:
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)

    def ensure(count: int) -> None:
        # luo_ensure_nofile_limit(): 32 fds of slack; each emulated session
        # handle is one fd here, the emulator keeps a second one (a pipe).
        want = 2 * count + 32 + len(os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
            except (ValueError, OSError) as exc:
                pytest.skip(f"cannot raise RLIMIT_NOFILE to {want}: {exc}")

    yield ensure
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    except (ValueError, OSError):
        pass


# -- the four selftests -------------------------------------------------------------

def test_luo_kexec_simple(machine: Machine) -> None:
    state, token = "kexec_simple_state", 999
    dev = machine.emu.open()
    stage, _ = machine.detect_stage(dev, state)
    assert stage == 1
    machine.hold(create_state_file(dev, state, token, 2))
    session = dev.create_session("test-session")
    create_and_preserve_memfd(session, 0x1A, "hello kexec world")
    machine.hold(session)
    dev.close()
    machine.reboot()

    dev = machine.emu.open()
    stage, state_session = machine.detect_stage(dev, state)
    assert stage == 2
    assert restore_and_read_stage(state_session, token) == 2
    session = dev.retrieve_session("test-session")
    os.close(restore_and_verify_memfd(session, 0x1A, "hello kexec world"))
    session.finish()
    session.close()
    state_session.finish()
    state_session.close()
    dev.close()


def test_luo_multi_session(machine: Machine) -> None:
    state, token = "kexec_multi_state", 998
    files = {
        "multi-test-files-1": {0x1001: "Data for session files 1"},
        "multi-test-files-2": {0x2002: "First file for session files 2", 0x3003: "Second file for session files 2"},
    }
    empty = ["multi-test-empty-1", "multi-test-empty-2"]
    dev = machine.emu.open()
    assert machine.detect_stage(dev, state)[0] == 1
    machine.hold(create_state_file(dev, state, token, 2))
    for name in empty:
        machine.hold(dev.create_session(name))
    for name, contents in files.items():
        session = dev.create_session(name)
        machine.hold(session)
        for tok, data in contents.items():
            create_and_preserve_memfd(session, tok, data)
    dev.close()
    machine.reboot()

    dev = machine.emu.open()
    stage, state_session = machine.detect_stage(dev, state)
    assert stage == 2 and restore_and_read_stage(state_session, token) == 2
    retrieved = {name: dev.retrieve_session(name) for name in empty + list(files)}
    for name, contents in files.items():
        for tok, data in contents.items():
            os.close(restore_and_verify_memfd(retrieved[name], tok, data))
    for session in retrieved.values():
        session.finish()
        session.close()
    state_session.finish()
    state_session.close()
    dev.close()


def test_luo_stress_files(machine: Machine, nofile: Any) -> None:
    state, token, count = "kexec_many_files_state", 9999, 500
    nofile(count)
    dev = machine.emu.open()
    assert machine.detect_stage(dev, state)[0] == 1
    machine.hold(create_state_file(dev, state, token, 2))
    session = dev.create_session("many_files_session")
    machine.hold(session)
    for i in range(count):
        create_and_preserve_memfd(session, i, f"file-data-{i}")
    dev.close()
    machine.reboot()

    dev = machine.emu.open()
    stage, state_session = machine.detect_stage(dev, state)
    assert stage == 2 and restore_and_read_stage(state_session, token) == 2
    session = dev.retrieve_session("many_files_session")
    for i in range(count):
        os.close(restore_and_verify_memfd(session, i, f"file-data-{i}"))
    session.finish()
    session.close()
    state_session.finish()
    state_session.close()
    dev.close()


def test_luo_stress_sessions(machine: Machine, nofile: Any) -> None:
    state, token, count = "kexec_many_state", 999, 2000
    nofile(count)
    dev = machine.emu.open()
    assert machine.detect_stage(dev, state)[0] == 1
    machine.hold(create_state_file(dev, state, token, 2))
    for i in range(count):
        machine.hold(dev.create_session(f"many-test-{i}"))
    dev.close()
    machine.reboot()

    dev = machine.emu.open()
    stage, state_session = machine.detect_stage(dev, state)
    assert stage == 2 and restore_and_read_stage(state_session, token) == 2
    for i in range(count):
        s = dev.retrieve_session(f"many-test-{i}")
        s.finish()
        s.close()
    state_session.finish()
    state_session.close()
    dev.close()


# -- what a kexec keeps -----------------------------------------------------------

def test_memfd_contents_size_position_seals(machine: Machine) -> None:
    dev = machine.emu.open()
    session = dev.create_session("state")
    machine.hold(session)
    layouts: Dict[int, Dict[str, Any]] = {}
    specs = [
        (1, b"", 0, 0, 0),
        (2, b"short", 3, 0, 0),
        (3, os.urandom(3 * PAGE + 5), 2 * PAGE, 0, fcntl.F_SEAL_WRITE),
        (4, b"z" * 10, 10, 4 * PAGE, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL),
        (5, b"\0" * 100 + b"after zeros", 100, 0, F_SEAL_FUTURE_WRITE),
    ]
    for token, data, pos, size, seals in specs:
        fd = os.memfd_create(f"f{token}", os.MFD_ALLOW_SEALING)
        os.write(fd, data)
        if size:
            os.ftruncate(fd, size)
        os.lseek(fd, pos, os.SEEK_SET)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        final = size or len(data)
        expected = (data + bytes(final))[:final]
        layouts[token] = dict(data=expected, pos=pos, seals=fcntl.fcntl(fd, fcntl.F_GET_SEALS))
        session.preserve(fd, token)
        os.close(fd)
    dev.close()
    machine.reboot()
    dev = machine.emu.open()
    incoming = dev.retrieve_session("state")
    for token, want in layouts.items():
        fd = incoming.retrieve(token)
        try:
            assert os.fstat(fd).st_size == len(want["data"])
            assert os.pread(fd, len(want["data"]) + 1, 0) == want["data"]
            assert os.lseek(fd, 0, os.SEEK_CUR) == want["pos"]
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == want["seals"]
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(fd)
    incoming.close()
    dev.close()


def test_session_order_and_names_survive_two_kexecs(machine: Machine) -> None:
    names = [f"n{i}-ü" for i in range(120)]
    dev = machine.emu.open()
    for name in names:
        machine.hold(dev.create_session(name))
    dev.close()
    machine.reboot()
    dev = machine.emu.open()
    incoming = [dev.retrieve_session(n) for n in names]
    # Carried again by new outgoing sessions of the same names.
    for name in names:
        machine.hold(dev.create_session(name))
    for s in incoming:
        s.close()
    dev.close()
    machine.reboot()
    dev = machine.emu.open()
    for name in names:
        s = dev.retrieve_session(name)
        assert s.name == name
        s.close()
    dev.close()


def test_unretrieved_sessions_are_gone_after_the_next_kexec(machine: Machine) -> None:
    dev = machine.emu.open()
    for name in ("kept", "ignored"):
        s = dev.create_session(name)
        create_and_preserve_memfd(s, 1, name)
        machine.hold(s)
    dev.close()
    machine.reboot()
    dev = machine.emu.open()
    kept = dev.retrieve_session("kept")
    fd = restore_and_verify_memfd(kept, 1, "kept")
    out = dev.create_session("kept-again")
    kept.finish()
    out.preserve(fd, 1)
    os.close(fd)
    machine.hold(out)
    kept.close()
    dev.close()
    machine.reboot()
    dev = machine.emu.open()
    for name in ("kept", "ignored"):
        with pytest.raises(FileNotFoundError):
            dev.retrieve_session(name)
    s = dev.retrieve_session("kept-again")
    os.close(restore_and_verify_memfd(s, 1, "kept"))
    s.close()
    dev.close()


def test_liveupdate_number_counts_kexecs() -> None:
    emu = Emulator()
    assert emu.liveupdate_num == 0
    for n in range(1, 8):
        emu.kexec()
        assert emu.liveupdate_num == n


def test_kexec_with_the_device_open() -> None:
    # The reboot does not care who holds the device; the new kernel's
    # device starts free.
    emu = Emulator()
    old = emu.open()
    emu.kexec()
    new = emu.open()
    new.close()
    old.close()


# -- handles of the old kernel --------------------------------------------------------

def test_stale_handles_raise_estale_with_a_clear_message() -> None:
    emu = Emulator()
    dev = emu.open()
    out = dev.create_session("old-outgoing")
    fd = os.memfd_create("x")
    try:
        out.preserve(fd, 1)
        emu.kexec()
        calls = [
            lambda: dev.create_session("after"),
            lambda: dev.retrieve_session("old-outgoing"),
            lambda: out.preserve(fd, 2),
            lambda: out.retrieve(1),
            lambda: out.finish(),
            lambda: out.name,
        ]
        for call in calls:
            with pytest.raises(StaleHandleError) as info:
                call()
            assert info.value.errno == errno.ESTALE
            assert "kexec" in str(info.value)
        # Closing a stale handle is quiet, and frees nothing of the new kernel.
        out.close()
        dev.close()
        with emu.open() as again:
            s = again.retrieve_session("old-outgoing")
            s.close()
    finally:
        os.close(fd)


def test_incoming_handle_is_stale_after_another_kexec() -> None:
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("twice")
    dev.close()
    emu.kexec()
    s.close()
    dev = emu.open()
    incoming = dev.retrieve_session("twice")
    dev.close()
    emu.kexec()
    with pytest.raises(StaleHandleError):
        incoming.retrieve(0)
    incoming.close()


# -- images ------------------------------------------------------------------------------

def _prepare(emu: Emulator) -> List[Any]:
    dev = emu.open()
    held = []
    for i in range(3):
        s = dev.create_session(f"img-{i}")
        for t in range(i + 1):
            fd = os.memfd_create("img")
            os.write(fd, b"image %d/%d " % (i, t) * (t * 700 + 1))
            os.lseek(fd, t, os.SEEK_SET)
            s.preserve(fd, t)
            os.close(fd)
        held.append(s)
    dev.close()
    return held


def _check(emu: Emulator) -> None:
    with emu.open() as dev:
        for i in range(3):
            s = dev.retrieve_session(f"img-{i}")
            for t in range(i + 1):
                fd = s.retrieve(t)
                try:
                    assert os.pread(fd, 1 << 20, 0) == b"image %d/%d " % (i, t) * (t * 700 + 1)
                    assert os.lseek(fd, 0, os.SEEK_CUR) == t
                finally:
                    os.close(fd)
            s.finish()
            s.close()


def test_image_round_trip(tmp_path: Any) -> None:
    emu = Emulator()
    held = _prepare(emu)
    path = tmp_path / "handover.img"
    emu.kexec(image=path)
    for s in held:
        s.close()
    loaded = Emulator.from_image(path)
    assert loaded.liveupdate_num == emu.liveupdate_num == 1
    _check(loaded)
    # The image is the handover: the same file boots again, independently.
    _check(Emulator.from_image(path))
    _check(emu)


def test_save_image_after_kexec(tmp_path: Any) -> None:
    emu = Emulator()
    held = _prepare(emu)
    emu.kexec()
    for s in held:
        s.close()
    path = tmp_path / "later.img"
    emu.save_image(path)
    _check(Emulator.from_image(path))


def test_image_chain_of_kexecs(tmp_path: Any) -> None:
    # Boot from an image, run, kexec into another image, boot from that.
    emu = Emulator()
    held = _prepare(emu)
    emu.kexec(image=tmp_path / "one.img")
    for s in held:
        s.close()
    second = Emulator.from_image(tmp_path / "one.img")
    held = _prepare(second)
    second.kexec(image=tmp_path / "two.img")
    for s in held:
        s.close()
    third = Emulator.from_image(tmp_path / "two.img")
    assert third.liveupdate_num == 2
    _check(third)


def test_first_boot_image(tmp_path: Any) -> None:
    emu = Emulator()
    emu.save_image(tmp_path / "empty.img")
    booted = Emulator.from_image(tmp_path / "empty.img")
    assert booted.liveupdate_num == 0
    with booted.open() as dev:
        with pytest.raises(FileNotFoundError):
            dev.retrieve_session("anything")


def test_not_an_image(tmp_path: Any) -> None:
    path = tmp_path / "junk.img"
    path.write_bytes(b"definitely not an image")
    with pytest.raises(OSError) as info:
        Emulator.from_image(path)
    assert info.value.errno == errno.ENOEXEC
    assert not isinstance(info.value, KernelPanic)


def test_panicked_emulator_refuses_politely() -> None:
    emu = Emulator()
    dev = emu.open()
    handles = [dev.create_session(f"p{i}") for i in range(51)]
    with pytest.raises(FileExistsError):
        dev.create_session("p0")
    dev.close()
    with pytest.raises(KernelPanic):
        emu.kexec()
    with pytest.raises(OSError) as info:
        emu.open()
    assert info.value.errno == errno.ENODEV
    for h in handles:
        h.close()
    # The process-wide default emulator is unaffected.
    assert isinstance(liveupdate.Emulator(), Emulator)
