"""memfds of VM-memory size: memory kept in proportion to the kernel's own
record (16 bytes a page), and the kernel's refusals at the limits.

The memory checks count Python allocations (tracemalloc) over a whole
cycle of a sparse 4 GiB memfd: the kernel's folio array for it is 16 MiB;
the emulator must stay well under that (it keeps runs, one byte a page).
They are not timed (bench: tools/bench_emulator.py --memfd).
"""
from __future__ import annotations

import errno
import os
import tracemalloc

import pytest

from liveupdate.emulator import Emulator, image, walk
from liveupdate.emulator import memfd_luo
from liveupdate.emulator.walk import Memfd

GIB = 1 << 30
PAGE = 4096


def _sparse(size: int, marks: "dict[int, bytes]") -> int:
    fd = os.memfd_create("vm-ram")
    os.ftruncate(fd, size)
    for offset, data in marks.items():
        os.pwrite(fd, data, offset)
    return fd


def test_a_4_gib_memfd_cycle_costs_less_than_the_kernels_folio_array() -> None:
    size = 4 * GIB
    kernel_record = size // PAGE * 16  # 16 MiB
    fd = _sparse(size, {0: b"first", size - 4: b"last", GIB + 5: b"middle"})
    tracemalloc.start()
    try:
        emu = Emulator()
        dev = emu.open()
        s = dev.create_session("vm")
        s.preserve(fd, 1)
        dev.close()
        emu.kexec()
        s.close()
        [memfd] = [r for r in walk(emu) if isinstance(r, Memfd)]
        assert len(memfd.folios) == size // PAGE and memfd.folios[-1][2] == size // PAGE - 1
        with emu.open() as dev:
            incoming = dev.retrieve_session("vm")
            new = incoming.retrieve(1)
            incoming.finish()
            incoming.close()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < kernel_record // 2, f"peak {peak >> 20} MiB for a 4 GiB memfd"
    assert os.pread(new, 6, GIB + 5) == b"middle" and os.pread(new, 4, size - 4) == b"last"
    os.close(new)
    os.close(fd)


def test_an_image_of_a_sparse_memfd_is_small_and_boots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    size = 2 * GIB
    fd = _sparse(size, {PAGE * 1000: b"x" * 3 * PAGE, size - 1: b"z"})
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("vm")
    s.preserve(fd, 1)
    dev.close()
    path = tmp_path / "vm.img"
    emu.kexec(image=str(path))
    s.close()
    # Version 1 held 16 bytes per page (8 MiB here) and every page's data.
    assert os.path.getsize(path) < 64 << 10
    tracemalloc.start()
    try:
        booted = Emulator.from_image(str(path))
        with booted.open() as dev:
            incoming = dev.retrieve_session("vm")
            new = incoming.retrieve(1)
            incoming.close()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert os.fstat(new).st_size == size
    assert os.pread(new, 3 * PAGE + 1, PAGE * 1000 - 1) == b"\0" + b"x" * 3 * PAGE
    assert os.pread(new, 1, size - 1) == b"z"
    # The copy keeps holes as holes: only the written pages are allocated.
    assert os.fstat(new).st_blocks * 512 < 1 << 20
    os.close(new)
    os.close(fd)


def test_enomem_when_the_pages_pinned_would_exceed_ram() -> None:
    # The kernel allocates and pins every page of a preserved memfd, holes
    # included: two memfds of more than half the RAM each cannot both be.
    ram_pages = memfd_luo._host_pages()
    half = (ram_pages // 2 + 1) * PAGE
    a, b = _sparse(half, {}), _sparse(half, {})
    try:
        with Emulator().open() as dev, dev.create_session("big") as s:
            s.preserve(a, 1)
            with pytest.raises(OSError) as info:
                s.preserve(b, 2)
            assert info.value.errno == errno.ENOMEM
            assert "already pinned" in str(info.value)
    finally:
        os.close(a)
        os.close(b)


def test_an_image_claiming_more_pages_than_ram_is_refused_before_allocating(tmp_path) -> None:  # type: ignore[no-untyped-def]
    emu = Emulator()
    fd = _sparse(PAGE, {0: b"p"})
    with emu.open() as dev:
        s = dev.create_session("s")
        s.preserve(fd, 1)
        raw = None
        dev.close()
        emu.kexec()
        raw = bytearray(image.dumps(emu.memory.handover))
    s.close()
    os.close(fd)
    # The one DATA record becomes a ZERO record of 2**32-1 pages (16 TiB).
    import struct

    offset = raw.find(struct.pack("<II", 1, image.DATA))
    assert offset > 0
    pfn = struct.unpack_from("<Q", raw, offset - 8)[0]
    bad = raw[:offset - 8] + struct.pack("<QII", pfn, 0xFFFFFFFF, image.ZERO) + raw[offset + 8 + PAGE:]
    with pytest.raises(OSError) as info:
        image.loads(bytes(bad))
    assert info.value.errno in (errno.ENOMEM, errno.ENOEXEC)
