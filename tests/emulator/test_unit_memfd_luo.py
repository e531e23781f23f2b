"""Unit tests of the emulator's memfd handler and its host-side mechanics."""
from __future__ import annotations

import errno
import fcntl
import os
import resource
from typing import Iterator

import pytest

from liveupdate.emulator import Emulator, abi

MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)


def carried(emu: Emulator, fd: int, token: int = 1, name: str = "s") -> int:
    """Preserve ``fd``, kexec, retrieve it, finish: the new fd."""
    with emu.open() as dev:
        session = dev.create_session(name)
        session.preserve(fd, token)
    emu.kexec()
    session.close()
    with emu.open() as dev:
        incoming = dev.retrieve_session(name)
        new = incoming.retrieve(token)
        incoming.close()  # finishes it; the retrieved fd stays the caller's
    return new


def test_in_process_kexec_hands_back_the_same_pages() -> None:
    # No copy: the retrieved memfd is the same inode, its position is the
    # one at the kexec, not the original fd's later moves.
    emu = Emulator()
    fd = os.memfd_create("same")
    os.write(fd, b"x" * 10_000)
    new = carried(emu, fd)
    assert os.fstat(new).st_ino == os.fstat(fd).st_ino
    assert os.lseek(new, 0, os.SEEK_CUR) == 10_000
    os.lseek(fd, 0, os.SEEK_SET)
    assert os.lseek(new, 0, os.SEEK_CUR) == 10_000  # a new open file, its own position
    assert not os.get_inheritable(new)
    os.close(new)
    os.close(fd)


def test_noexec_memfd_comes_back_as_the_kernel_makes_it() -> None:
    # The kernel's retrieved memfd is a 0777 inode: F_SEAL_EXEC on it
    # implies the write seals. The emulator copies rather than reopen then.
    emu = Emulator()
    try:
        fd = os.memfd_create("noexec", os.MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL)
    except OSError:
        pytest.skip("MFD_NOEXEC_SEAL needs Linux 6.3")
    os.write(fd, b"data")
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & abi.F_SEAL_EXEC
    new = carried(emu, fd)
    assert os.fstat(new).st_ino != os.fstat(fd).st_ino
    assert os.fstat(new).st_mode & 0o777 == 0o777
    implied = abi.F_SEAL_SHRINK | abi.F_SEAL_GROW | abi.F_SEAL_WRITE | abi.F_SEAL_FUTURE_WRITE
    assert fcntl.fcntl(new, fcntl.F_GET_SEALS) & implied == implied
    assert os.pread(new, 4, 0) == b"data"
    os.close(new)
    os.close(fd)


def test_retrieved_file_is_busy_until_finish() -> None:
    emu = Emulator()
    fd = os.memfd_create("busy")
    with emu.open() as dev:
        s = dev.create_session("a")
        s.preserve(fd, 1)
        emu.kexec()
        s.close()
    with emu.open() as dev:
        incoming = dev.retrieve_session("a")
        new = incoming.retrieve(1)
        with dev.create_session("b") as out:
            with pytest.raises(OSError) as info:
                out.preserve(new, 2)
            assert info.value.errno == errno.EBUSY
            incoming.finish()
            out.preserve(new, 2)
        incoming.close()
    os.close(new)
    os.close(fd)


def test_o_path_fd_is_ebadf() -> None:
    emu = Emulator()
    fd = os.memfd_create("p")
    path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH)
    with emu.open() as dev, dev.create_session("p") as s:
        with pytest.raises(OSError) as info:
            s.preserve(path_fd, 1)
        assert info.value.errno == errno.EBADF
        s.preserve(fd, 1)
    os.close(path_fd)
    os.close(fd)


@pytest.fixture
def tight_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip("needs a finite hard RLIMIT_NOFILE")
    probe = os.dup(0)
    os.close(probe)
    yield probe
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_preserve_needs_no_fd_of_the_caller(tight_limit: int) -> None:
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("tight")
    fds = [os.memfd_create("t") for _ in range(5)]
    lowest = os.dup(0)
    os.close(lowest)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))  # not one fd free
    try:
        for token, fd in enumerate(fds):
            s.preserve(fd, token)
        with pytest.raises(OSError) as info:
            dev.create_session("one more")  # a session does cost one fd
        assert info.value.errno == errno.EMFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    s.close()
    dev.close()
    for fd in fds:
        os.close(fd)
