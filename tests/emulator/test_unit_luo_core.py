"""Unit tests of the emulated device: ioctl argument rules, boot, images."""
from __future__ import annotations

import errno
import os
import struct
from typing import Iterator, Tuple

import pytest

from liveupdate import KernelPanic
from liveupdate.emulator import Emulator, abi, image, kfile, walk
from liveupdate.emulator.walk import File

# The uapi's numbers written out, _IO(0xBA, nr): the emulator takes its own
# from the library's command table, so these keep the tests independent.
CREATE_SESSION = 0xBA00
SESSION_PRESERVE_FD = 0xBA40
SESSION_FINISH = 0xBA42
SESSION_GET_NAME = 0xBA43

CREATE = struct.Struct("=Ii64s")


@pytest.fixture
def emu_dev() -> Iterator[Tuple[Emulator, int]]:
    emu = Emulator()
    fd = emu.port.open_device("/dev/liveupdate")
    yield emu, fd
    emu.port.close(fd)


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno  # type: ignore[return-value]


def test_device_ioctl_argument_rules(emu_dev: Tuple[Emulator, int]) -> None:
    emu, dev = emu_dev
    ioctl = emu.port.ioctl
    good = CREATE.pack(72, -1, b"s")
    assert errno_of(ioctl, dev, (0xBA << 8) | 2, good) == errno.EINVAL      # number out of the table
    assert errno_of(ioctl, dev, CREATE_SESSION, b"\x48\0") == errno.EFAULT  # no size field
    assert errno_of(ioctl, dev, (0xBB << 8) | 0, good) == errno.ENOTTY      # right number, other type
    assert errno_of(ioctl, dev, CREATE_SESSION, CREATE.pack(71, -1, b"s")) == errno.EINVAL
    assert errno_of(ioctl, dev, CREATE_SESSION, struct.pack("=I", 80) + good[4:] + b"\0\0\0\1\0\0\0\0") == errno.E2BIG
    assert errno_of(ioctl, dev, CREATE_SESSION, CREATE.pack(80, -1, b"s")) == errno.EFAULT
    out = ioctl(dev, CREATE_SESSION, struct.pack("=I", 80) + good[4:] + bytes(8))
    assert len(out) == 80
    fd = struct.unpack_from("=i", out, 4)[0]
    assert fd >= 0 and not os.get_inheritable(fd)
    # Session commands on the device fd are out of its table: EINVAL.
    assert errno_of(ioctl, dev, SESSION_GET_NAME, struct.pack("=II64s", 72, 0, b"")) == errno.EINVAL
    emu.port.close(fd)


def test_session_ioctl_rules(emu_dev: Tuple[Emulator, int]) -> None:
    emu, dev = emu_dev
    ioctl = emu.port.ioctl
    fd = struct.unpack_from("=i", ioctl(dev, CREATE_SESSION, CREATE.pack(72, -1, b"name")), 4)[0]
    try:
        assert errno_of(ioctl, fd, CREATE_SESSION, CREATE.pack(72, -1, b"x")) == errno.EINVAL  # below 0x40
        # finish on an outgoing session: the session kind is checked before the size
        assert errno_of(ioctl, fd, SESSION_FINISH, struct.pack("=I", 4)) == errno.EINVAL
        assert errno_of(ioctl, fd, SESSION_GET_NAME, struct.pack("=II64s", 72, 1, b"")) == errno.EINVAL
        out = ioctl(fd, SESSION_GET_NAME, struct.pack("=II64s", 72, 0, b""))
        assert out[8:].rstrip(b"\0") == b"name"
        # A short struct gets back only what it declared.
        preserve = struct.pack("=IiQ", 16, 999_999, 1)
        assert errno_of(ioctl, fd, SESSION_PRESERVE_FD, preserve) == errno.EBADF
    finally:
        emu.port.close(fd)


def test_name_rules_and_duplicates(emu_dev: Tuple[Emulator, int]) -> None:
    emu, dev = emu_dev
    ioctl = emu.port.ioctl
    assert errno_of(ioctl, dev, CREATE_SESSION, CREATE.pack(72, -1, b"")) == errno.EINVAL
    assert errno_of(ioctl, dev, CREATE_SESSION, CREATE.pack(72, -1, b"x" * 64)) == errno.EINVAL
    fd = struct.unpack_from("=i", ioctl(dev, CREATE_SESSION, CREATE.pack(72, -1, b"x" * 63)), 4)[0]
    assert errno_of(ioctl, dev, CREATE_SESSION, CREATE.pack(72, -1, b"x" * 63)) == errno.EEXIST
    emu.port.close(fd)
    # The name is free again once its last fd is closed.
    fd = struct.unpack_from("=i", ioctl(dev, CREATE_SESSION, CREATE.pack(72, -1, b"x" * 63)), 4)[0]
    os.close(fd)  # a bare close: the port notices when the answer depends on it
    fd = struct.unpack_from("=i", ioctl(dev, CREATE_SESSION, CREATE.pack(72, -1, b"x" * 63)), 4)[0]
    emu.port.close(fd)


def test_duplicate_at_a_full_block_leaves_an_empty_block_and_the_next_boot_panics() -> None:
    # The kernel grows the chain before the duplicate check and does not
    # shrink it back: 51 sessions + 1 refused duplicate = 2 blocks, the
    # second with count 0, which the next kernel refuses.
    emu = Emulator()
    with emu.open() as dev:
        sessions = [dev.create_session(f"s{i}") for i in range(51)]
        with pytest.raises(FileExistsError):
            dev.create_session("s0")
        assert emu.kernel.sessions.outgoing.block_set.nblocks == 2  # type: ignore[union-attr]
    with pytest.raises(KernelPanic):
        emu.kexec()
    assert emu.kernel is None
    for s in sessions:
        s.close()


def test_incompatible_root_panics() -> None:
    emu = Emulator()
    emu.kexec()
    pa, _ = emu.memory.handover.subtrees["LUO"]
    emu.memory.handover.pages[pa >> 12][:8] = b"luo-v4\0\0"
    with pytest.raises(KernelPanic):
        Emulator.boot(emu.memory)


def test_failed_deserialize_is_eio_on_every_open() -> None:
    emu = Emulator()
    with emu.open() as dev:
        s = dev.create_session("a")
        fd = os.memfd_create("x")
        s.preserve(fd, 5)
        os.close(fd)
        emu.kexec()
        s.close()
    f = next(r for r in walk(emu) if isinstance(r, File))
    emu.memory.write(f.pa, b"unknown-v1\0")  # no handler: ENOENT while deserializing
    emu2 = Emulator.boot(emu.memory)
    for _ in range(2):
        with pytest.raises(OSError) as info:
            emu2.open()
        assert info.value.errno == errno.EIO


def test_liveupdate_number_counts_kexecs() -> None:
    emu = Emulator()
    assert emu.liveupdate_num == 0
    for n in range(1, 4):
        emu.kexec()
        assert emu.liveupdate_num == n


def test_image_round_trip_restores_contents(tmp_path) -> None:  # type: ignore[no-untyped-def]
    emu = Emulator()
    payload = os.urandom(3 * 4096 + 17)
    with emu.open() as dev:
        s = dev.create_session("img")
        fd = os.memfd_create("m", os.MFD_ALLOW_SEALING)
        os.write(fd, payload)
        os.lseek(fd, 100, os.SEEK_SET)
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, abi.F_SEAL_GROW | abi.F_SEAL_SHRINK)
        s.preserve(fd, 7)
        emu.kexec(image=tmp_path / "a.img")
        s.close()
    os.close(fd)
    emu2 = Emulator.from_image(tmp_path / "a.img")
    assert emu2.liveupdate_num == 1
    with emu2.open() as dev:
        s = dev.retrieve_session("img")
        new = s.retrieve(7)
        assert os.pread(new, len(payload) + 10, 0) == payload
        assert os.lseek(new, 0, os.SEEK_CUR) == 100
        assert fcntl.fcntl(new, fcntl.F_GET_SEALS) == abi.F_SEAL_GROW | abi.F_SEAL_SHRINK
        assert not os.get_inheritable(new)
        os.close(new)
        s.finish()
        s.close()


@pytest.mark.parametrize("mangle", [
    lambda d: d[:-1],
    lambda d: b"X" + d[1:],
    lambda d: d[:8] + b"\3" + d[9:],  # a version this reader does not know
    lambda d: d[:24] + struct.pack("<Q", 2**40) + d[32:],
    lambda d: d[:-8] + b"garbage!" + d[-8:],
    lambda d: b"",
])
def test_bad_images_are_enoexec(tmp_path, mangle) -> None:  # type: ignore[no-untyped-def]
    emu = Emulator()
    emu.kexec()
    data = image.dumps(emu.memory.handover)
    assert image.loads(data).handover.subtrees == emu.memory.handover.subtrees
    path = tmp_path / "bad.img"
    path.write_bytes(mangle(data))
    with pytest.raises(OSError) as info:
        Emulator.from_image(path)
    assert info.value.errno == errno.ENOEXEC


def test_hugetlb_memfd_has_no_handler() -> None:
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB)
    except OSError:
        pytest.skip("no hugetlbfs here")
    emu = Emulator()
    with emu.open() as dev, dev.create_session("h") as s:
        with pytest.raises(FileNotFoundError):
            s.preserve(fd, 1)
    os.close(fd)


def test_files_held_as_mappings_when_fds_are_scarce(monkeypatch: pytest.MonkeyPatch) -> None:
    if not kfile._map_files_usable():
        pytest.skip("/proc/self/map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")
    monkeypatch.setattr(kfile, "fd_budget", lambda: 0)
    emu = Emulator()
    with emu.open() as dev:
        s = dev.create_session("mapped")
        fds = []
        for token in range(3):
            fd = os.memfd_create("m")
            os.write(fd, b"%d" % token * 5000)
            s.preserve(fd, token)
            fds.append(fd)
        with pytest.raises(OSError) as info:
            s.preserve(fds[0], 9)  # the same inode: EBUSY also when held as a mapping
        assert info.value.errno == errno.EBUSY
        for fd in fds:
            os.close(fd)
        emu.kexec()
        s.close()
    with emu.open() as dev:
        s = dev.retrieve_session("mapped")
        for token in range(3):
            new = s.retrieve(token)
            assert os.pread(new, 10_000, 0) == b"%d" % token * 5000
            os.close(new)
        s.finish()
        s.close()
