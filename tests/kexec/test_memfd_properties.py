"""What the memfd handler promises to carry across a kexec besides the
bytes (mm/memfd_luo.c, "Preserved Properties"): the size (holes come back
as zeros), the file position as it is at the kexec (not at preserve time),
the O_RDWR status and the seals."""
from __future__ import annotations

import fcntl
import os
import random

import pytest

from .memfds import PAGE, memfd_with

F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_GET_SEALS, F_ADD_SEALS = 1034, 1033  # F_LINUX_SPECIFIC_BASE + 10 / + 9

HEAD = b"head of a sparse file"
MIDDLE = b"in the middle"
MIDDLE_AT = 2 * PAGE + 5
SPARSE_SIZE = 3 * PAGE + 123


def retrieve_all(lk, name: str, tokens):
    dev = lk.open()
    session = dev.retrieve_session(name)
    fds = {token: session.retrieve(token) for token in tokens}
    return session, fds


def close_all(session, fds) -> None:
    for fd in fds.values():
        os.close(fd)
    session.finish()
    session.close()


def test_size_holes_and_status(liveupdate_kexec) -> None:
    lk = liveupdate_kexec
    name = "kx-memfd-size"
    if lk.stage == 1:
        session = lk.keep(lk.open().create_session(name))
        sparse = os.memfd_create("sparse")
        empty = os.memfd_create("empty")
        big = os.memfd_create("big")
        try:
            os.ftruncate(sparse, SPARSE_SIZE)  # pages never written are holes
            os.pwrite(sparse, HEAD, 0)
            os.pwrite(sparse, MIDDLE, MIDDLE_AT)
            os.ftruncate(big, 64 * PAGE)
            os.pwrite(big, b"last", 64 * PAGE - 4)
            session.preserve(sparse, 1)
            session.preserve(empty, 2)
            session.preserve(big, 3)
        finally:
            for fd in (sparse, empty, big):
                os.close(fd)
        lk.kexec()

    session, fds = retrieve_all(lk, name, [1, 2, 3])
    try:
        sparse, empty, big = fds[1], fds[2], fds[3]
        assert os.fstat(sparse).st_size == SPARSE_SIZE
        expected = bytearray(SPARSE_SIZE)
        expected[: len(HEAD)] = HEAD
        expected[MIDDLE_AT: MIDDLE_AT + len(MIDDLE)] = MIDDLE
        assert os.pread(sparse, SPARSE_SIZE + 10, 0) == bytes(expected)
        assert os.fstat(empty).st_size == 0
        assert os.pread(empty, 10, 0) == b""
        assert os.fstat(big).st_size == 64 * PAGE
        assert os.pread(big, 4, 64 * PAGE - 4) == b"last"
        for fd in fds.values():
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        # Not sealed, so the file is as writable and growable as before.
        os.ftruncate(empty, 10)
        assert os.pwrite(empty, b"0123456789", 0) == 10
    finally:
        close_all(session, fds)


def test_position_is_taken_at_the_kexec(liveupdate_kexec) -> None:
    lk = liveupdate_kexec
    name = "kx-memfd-position"
    data = bytes(range(256)) * (2 * PAGE // 256)
    if lk.stage == 1:
        rng = random.Random()
        lk.state["before"] = rng.randrange(1, len(data) // 2)
        lk.state["after"] = rng.randrange(len(data) // 2, len(data))
        session = lk.keep(lk.open().create_session(name))
        moved = memfd_with(data, "moved", size=len(data))
        lk.keep(moved)
        os.lseek(moved, lk.state["before"], os.SEEK_SET)
        session.preserve(moved, 1)
        # The handler reads f_pos again when the kexec freezes the file.
        os.lseek(moved, lk.state["after"], os.SEEK_SET)
        still = memfd_with(data, "still", size=len(data))
        try:
            os.lseek(still, lk.state["before"], os.SEEK_SET)
            session.preserve(still, 2)
        finally:
            os.close(still)
        lk.kexec()

    before, after = lk.state["before"], lk.state["after"]
    session, fds = retrieve_all(lk, name, [1, 2])
    try:
        assert os.lseek(fds[1], 0, os.SEEK_CUR) == after
        assert os.lseek(fds[2], 0, os.SEEK_CUR) == before
        # Reading goes on from there.
        assert os.read(fds[1], 7) == data[after: after + 7]
        assert os.read(fds[2], 7) == data[before: before + 7]
    finally:
        close_all(session, fds)


SEALED = {
    # token: (memfd flags, seals added before preserving)
    1: (0, 0),  # no MFD_ALLOW_SEALING: the kernel shows F_SEAL_SEAL
    2: (os.MFD_ALLOW_SEALING, 0),
    3: (os.MFD_ALLOW_SEALING, F_SEAL_SHRINK | F_SEAL_GROW),
    4: (os.MFD_ALLOW_SEALING, F_SEAL_WRITE | F_SEAL_SEAL),
}


def seals(fd: int) -> int:
    return fcntl.fcntl(fd, F_GET_SEALS)


def test_seals(liveupdate_kexec) -> None:
    lk = liveupdate_kexec
    name = "kx-memfd-seals"
    if lk.stage == 1:
        session = lk.keep(lk.open().create_session(name))
        for token, (flags, added) in SEALED.items():
            fd = memfd_with(b"sealed %d" % token, "sealed", flags)
            try:
                if added:
                    fcntl.fcntl(fd, F_ADD_SEALS, added)
                lk.state[str(token)] = seals(fd)
                session.preserve(fd, token)
            finally:
                os.close(fd)
        lk.kexec()

    session, fds = retrieve_all(lk, name, list(SEALED))
    try:
        assert lk.state["1"] == F_SEAL_SEAL and lk.state["2"] == 0
        for token, fd in fds.items():
            assert seals(fd) == lk.state[str(token)], token
            assert os.pread(fd, 8, 0) == b"sealed %d" % token
        with pytest.raises(PermissionError):
            os.ftruncate(fds[3], 1)
        with pytest.raises(PermissionError):
            os.ftruncate(fds[3], 2 * PAGE)
        with pytest.raises(PermissionError):
            os.pwrite(fds[4], b"x", 0)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fds[4], F_ADD_SEALS, F_SEAL_GROW)
        # Unsealed ones still take seals.
        fcntl.fcntl(fds[2], F_ADD_SEALS, F_SEAL_GROW)
        assert seals(fds[2]) == F_SEAL_GROW
    finally:
        close_all(session, fds)
