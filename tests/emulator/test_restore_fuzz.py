"""Corrupted handovers: every one gets the kernel's outcome, none hangs or
crashes the emulator.

Where the kernel decides, by stage:

* early boot, luo_early_startup() (kernel/liveupdate/luo_core.c): a root
  smaller than struct luo_ser, an incompatible string, or a session chain
  that kho_block_set_restore() refuses (cycle, over-long, a block count of
  0 or above 51) -> luo_restore_fail() -> panic: ``KernelPanic``;
* first open, luo_session_deserialize(): a duplicate session name, a file
  chain that does not restore, an unknown handler compatible, a file count
  that does not match -> the open fails with EIO, and so does every later
  open (the result is remembered);
* retrieve, memfd_luo_retrieve() (mm/memfd_luo.c): seals the handler does
  not know -> EOPNOTSUPP, a folio that was not preserved -> EIO; the first
  failure is remembered and returned by every later retrieve of that token
  (luo_retrieve_file()).

Container damage (bytes that are no image at all, truncation) is refused
by the image loader with ENOEXEC before anything boots.
"""
from __future__ import annotations

import errno
import os
import random
import struct
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveupdate import KernelPanic
from liveupdate.emulator import Emulator, image, walk
from liveupdate.emulator.walk import Block, File, Memfd, Root, Session

PAGE = 4096
U64 = struct.Struct("<Q")
# LIVEUPDATE_HYPOTHESIS_PROFILE=long (as for test_properties.py) fuzzes longer.
LONG = os.environ.get("LIVEUPDATE_HYPOTHESIS_PROFILE") == "long"
EXAMPLES = 3000 if LONG else 150


# -- a known-good handover to corrupt ------------------------------------------

def _build_image() -> bytes:
    emu = Emulator()
    dev = emu.open()
    held = []
    # "big": 60 sessions -> 2 session blocks; "files": 70 files -> 2 blocks.
    for i in range(60):
        held.append(dev.create_session(f"s{i:02d}"))
    files = dev.create_session("files")
    held.append(files)
    for token in range(70):
        fd = os.memfd_create("f")
        os.write(fd, b"file %d " % token * (token + 1))
        files.preserve(fd, token)
        os.close(fd)
    small = dev.create_session("small")
    held.append(small)
    fd = os.memfd_create("two-pages")
    os.write(fd, b"P" * (PAGE + 10))
    small.preserve(fd, 7)
    os.close(fd)
    dev.close()
    emu.kexec()
    for s in held:
        s.close()
    return image.dumps(emu.memory.handover)


_IMAGE: Optional[bytes] = None


def base_image() -> bytes:
    global _IMAGE
    if _IMAGE is None:
        _IMAGE = _build_image()
    return _IMAGE


class Damaged:
    """A loaded copy of the base image, its records located, ready to edit."""

    def __init__(self) -> None:
        self.memory = image.loads(base_image())
        self.records = list(walk(self.memory))

    def first(self, kind: type, **match: Any) -> Any:
        for r in self.records:
            if isinstance(r, kind) and all(getattr(r, k) == v for k, v in match.items()):
                return r
        raise LookupError(f"no {kind.__name__} {match}")

    def memfd(self, session: bytes, token: int) -> Any:
        return self.first(Memfd, pa=self.first(File, session=session, token=token).data)

    def all(self, kind: type, **match: Any) -> List[Any]:
        return [r for r in self.records if isinstance(r, kind) and all(getattr(r, k) == v for k, v in match.items())]

    def write(self, pa: int, data: bytes) -> None:
        """Write into the handed-over memory; a page not there yet becomes
        a preserved page (so crafted chains are memory the kernel owns)."""
        self.memory.write(pa, data)
        handover = self.memory.handover.pages
        for pfn in range(pa // PAGE, (pa + len(data) - 1) // PAGE + 1):
            if pfn not in handover:
                handover[pfn] = self.memory.pages[pfn]

    def u64(self, pa: int, value: int) -> None:
        self.memory.write(pa, U64.pack(value))

    def boot(self) -> Emulator:
        return Emulator.boot(self.memory)


def expect_panic(damaged: Damaged) -> None:
    with pytest.raises(KernelPanic):
        damaged.boot()


def expect_eio(damaged: Damaged) -> None:
    emu = damaged.boot()
    for _ in range(3):
        with pytest.raises(OSError) as info:
            emu.open().close()
        assert info.value.errno == errno.EIO


def test_the_base_image_boots_and_restores() -> None:
    emu = Damaged().boot()
    with emu.open() as dev:
        s = dev.retrieve_session("files")
        for token in range(70):
            fd = s.retrieve(token)
            assert os.pread(fd, 1 << 16, 0) == b"file %d " % token * (token + 1)
            os.close(fd)
        s.close()


# -- early boot: the root and the session chain -> panic ---------------------------

@pytest.mark.parametrize("compatible", [b"luo-v4\0\0", b"luo-v6\0\0", b"LUO-V5\0\0", b"\0" * 8,
                                        b"luo-v55\0", b"luo-v5;b", b"\xff" * 8])
def test_incompatible_root_string_panics(compatible: bytes) -> None:
    d = Damaged()
    d.write(d.first(Root).pa, compatible)
    with pytest.raises(KernelPanic) as info:
        d.boot()
    # Shown as it is, whole: an opaque string, not a version read out of it.
    assert "'" + compatible.split(b"\0")[0].decode("utf-8", "backslashreplace") + "'" in str(info.value)


def test_a_root_string_is_compared_as_the_kernel_does_up_to_its_nul() -> None:
    # strncmp(compatible, "luo-v5", 8) stops at the NUL: what follows it in
    # the 8-byte field does not count (the emulator used to compare all 8).
    d = Damaged()
    d.write(d.first(Root).pa, b"luo-v5\0x")
    emu = d.boot()
    assert emu.liveupdate_num == 1
    with emu.open() as dev:
        dev.retrieve_session("files").close()


@pytest.mark.parametrize("size", [0, 8, 31])
def test_root_too_small_panics(size: int) -> None:
    d = Damaged()
    pa, _ = d.memory.handover.subtrees["LUO"]
    d.memory.handover.subtrees["LUO"] = (pa, size)
    expect_panic(d)


def test_larger_root_is_fine() -> None:
    d = Damaged()
    pa, _ = d.memory.handover.subtrees["LUO"]
    d.memory.handover.subtrees["LUO"] = (pa, 4096)
    with d.boot().open() as dev:
        dev.retrieve_session("small").close()


def test_no_luo_subtree_is_a_first_boot() -> None:
    d = Damaged()
    del d.memory.handover.subtrees["LUO"]
    emu = d.boot()
    assert emu.liveupdate_num == 0
    with emu.open() as dev:
        with pytest.raises(FileNotFoundError):
            dev.retrieve_session("small")


@pytest.mark.parametrize("which", ["self", "back-to-head"])
def test_session_chain_cycle_panics(which: str) -> None:
    d = Damaged()
    blocks = d.all(Block, chain="sessions")
    assert len(blocks) == 2
    target = blocks[1].pa if which == "self" else blocks[0].pa
    d.u64(blocks[1].pa, target)
    expect_panic(d)


@pytest.mark.parametrize("count", [0, 52, 2**64 - 1])
def test_session_block_count_out_of_range_panics(count: int) -> None:
    d = Damaged()
    d.u64(d.all(Block, chain="sessions")[1].pa + 8, count)
    expect_panic(d)


def test_session_chain_into_unpreserved_memory_panics() -> None:
    # What lies there is not a block (here: zeros, so a count of 0).
    d = Damaged()
    d.u64(d.all(Block, chain="sessions")[1].pa, 0x7FFF_F000_0000)
    expect_panic(d)


def test_session_chain_longer_than_the_cap_panics() -> None:
    # 10,001 linked blocks of one entry each: kho_block_add() refuses the
    # 10,001st (ENOSPC) before anything is deserialized.
    d = Damaged()
    root = d.first(Root)
    base = 0x7000_0000_0000
    for i in range(10_001):
        pa = base + i * PAGE
        nxt = pa + PAGE if i < 10_000 else 0
        entry = b"cap-%d" % i
        d.write(pa, U64.pack(nxt) + U64.pack(1) + entry.ljust(64, b"\0") + bytes(16))
    d.u64(root.pa + 16, base)
    expect_panic(d)


def test_session_chain_at_the_cap_boots() -> None:
    # 10,000 blocks is allowed: 10,000 sessions of one block each.
    d = Damaged()
    root = d.first(Root)
    base = 0x7000_0000_0000
    for i in range(10_000):
        pa = base + i * PAGE
        nxt = pa + PAGE if i < 9_999 else 0
        d.write(pa, U64.pack(nxt) + U64.pack(1) + (b"cap-%d" % i).ljust(64, b"\0") + bytes(16))
    d.u64(root.pa + 16, base)
    with d.boot().open() as dev:
        dev.retrieve_session("cap-9999").close()
        with pytest.raises(FileNotFoundError):
            dev.retrieve_session("small")


def test_zero_sessions_pa_means_no_sessions() -> None:
    d = Damaged()
    d.u64(d.first(Root).pa + 16, 0)
    with d.boot().open() as dev:
        with pytest.raises(FileNotFoundError):
            dev.retrieve_session("small")


# -- first open: deserializing sessions and files -> EIO -----------------------------

def test_duplicate_session_names_fail_every_open_with_eio() -> None:
    d = Damaged()
    s0, s1 = d.all(Session)[:2]
    d.write(s1.pa, s0.name.ljust(64, b"\0"))
    expect_eio(d)


def test_file_chain_cycle_is_eio() -> None:
    d = Damaged()
    blocks = d.all(Block, chain="files of 'files'")
    d.u64(blocks[1].pa, blocks[0].pa)
    expect_eio(d)


@pytest.mark.parametrize("count", [0, 64])
def test_file_block_count_out_of_range_is_eio(count: int) -> None:
    d = Damaged()
    d.u64(d.all(Block, chain="files of 'files'")[1].pa + 8, count)
    expect_eio(d)


@pytest.mark.parametrize("delta", [-1, +1, 2**40])
def test_file_count_mismatch_is_eio(delta: int) -> None:
    d = Damaged()
    s = d.first(Session, name=b"files")
    d.u64(s.pa + 72, s.files_count + delta)
    expect_eio(d)


@pytest.mark.parametrize("compatible", [b"memfd-v1", b"memfd-v3", b"memfd-v2x", b"MEMFD-V2", b"", b"\xff" * 48])
def test_unknown_handler_is_eio(compatible: bytes) -> None:
    d = Damaged()
    f = d.all(File, session=b"files")[33]
    d.write(f.pa, compatible.ljust(48, b"\0")[:48])
    expect_eio(d)


def test_zero_files_pa_with_a_count_is_a_session_without_files() -> None:
    # luo_file_deserialize(): no chain -> warn about the count, no files.
    d = Damaged()
    s = d.first(Session, name=b"small")
    d.u64(s.pa + 64, 0)
    with d.boot().open() as dev:
        session = dev.retrieve_session("small")
        with pytest.raises(FileNotFoundError):
            session.retrieve(7)
        session.finish()
        session.close()


def test_eio_also_after_a_failed_open_of_a_busy_device() -> None:
    d = Damaged()
    s0, s1 = d.all(Session)[:2]
    d.write(s1.pa, s0.name.ljust(64, b"\0"))
    emu = d.boot()
    with pytest.raises(OSError) as info:
        emu.open()
    assert info.value.errno == errno.EIO
    # EIO released the device: the next open is EIO again, not EBUSY.
    with pytest.raises(OSError) as info:
        emu.open()
    assert info.value.errno == errno.EIO


# -- retrieve: the memfd handler ------------------------------------------------------

def _retrieve_twice(d: Damaged, session: str, token: int) -> Tuple[int, int]:
    with d.boot().open() as dev:
        s = dev.retrieve_session(session)
        codes = []
        for _ in range(2):
            with pytest.raises(OSError) as info:
                os.close(s.retrieve(token))
            codes.append(info.value.errno)
        # A failed file does not stop finish (memfd_luo_finish() skips it).
        s.finish()
        s.close()
        return codes[0], codes[1]


@pytest.mark.parametrize("seals", [0x40, 0x80, 0x8000_0000])
def test_unknown_seals_fail_retrieve_with_eopnotsupp_every_time(seals: int) -> None:
    d = Damaged()
    m = d.memfd(b"small", 7)
    d.write(m.pa + 16, struct.pack("<I", seals | 1))
    assert _retrieve_twice(d, "small", 7) == (errno.EOPNOTSUPP, errno.EOPNOTSUPP)


def test_folio_not_preserved_fails_retrieve_with_eio_every_time() -> None:
    d = Damaged()
    m = d.memfd(b"small", 7)
    pfn, flags, index = m.folios[1]
    # Point the second folio at a page nobody preserved.
    table_chunk = U64.unpack(d.memory.read(m.pa + 32, 8))[0]
    table_page = U64.unpack(d.memory.read(table_chunk + 8, 8))[0]
    d.write(table_page + 16, U64.pack((0x7123_4567 & ((1 << 52) - 1)) | (flags << 52)))
    assert _retrieve_twice(d, "small", 7) == (errno.EIO, errno.EIO)


def test_other_files_still_retrieve_after_one_fails() -> None:
    d = Damaged()
    m = d.memfd(b"files", 40)
    d.write(m.pa + 16, struct.pack("<I", 0x41))
    with d.boot().open() as dev:
        s = dev.retrieve_session("files")
        with pytest.raises(OSError):
            s.retrieve(40)
        fd = s.retrieve(41)
        assert os.pread(fd, 1 << 16, 0) == b"file 41 " * 42
        os.close(fd)
        s.close()


# -- the image container --------------------------------------------------------------

@given(data=st.binary(max_size=4096))
@settings(max_examples=EXAMPLES, deadline=None)
def test_random_bytes_are_not_an_image(data: bytes) -> None:
    with pytest.raises(OSError) as info:
        image.loads(data)
    assert info.value.errno == errno.ENOEXEC


def test_every_truncation_is_refused() -> None:
    raw = base_image()
    cuts = sorted(set(range(0, 200)) | set(range(0, len(raw), max(1, len(raw) // 300))) | {len(raw) - 1})
    for cut in cuts:
        with pytest.raises(OSError) as info:
            image.loads(raw[:cut])
        assert info.value.errno == errno.ENOEXEC, cut


def test_header_counts_beyond_the_file_are_refused() -> None:
    raw = bytearray(base_image())
    for offset in (16, 24):  # number of subtrees, number of pages
        bad = bytearray(raw)
        bad[offset:offset + 4] = b"\xff\xff\xff\x7f"
        with pytest.raises(OSError) as info:
            image.loads(bytes(bad))
        assert info.value.errno == errno.ENOEXEC


# -- random damage to preserved kernel memory ------------------------------------------

def _kernel_pages(memory: Any) -> List[int]:
    return sorted(pfn for pfn, page in memory.pages.items() if isinstance(page, bytearray) and len(page))


def exercise(emu: Emulator) -> None:
    """Use whatever booted as user space would: every session the walk
    shows, every token, finish, close, and another kexec. Only OSError is
    an acceptable failure."""
    names = [r.name for r in walk(emu.memory.handover) if isinstance(r, Session)]
    tokens: Dict[bytes, List[int]] = {}
    for r in walk(emu.memory.handover):
        if isinstance(r, File):
            tokens.setdefault(r.session, []).append(r.token)
    try:
        dev = emu.open()
    except OSError as exc:
        assert exc.errno == errno.EIO
        return
    with dev:
        for name in names[:80]:
            if not name or b"\0" in name:
                continue
            try:
                s = dev.retrieve_session(name)
            except (OSError, ValueError):
                continue
            for token in tokens.get(name, [])[:80]:
                try:
                    fd = s.retrieve(token)
                except OSError:
                    continue
                os.pread(fd, 1 << 16, 0)
                os.close(fd)
            try:
                s.finish()
            except OSError:
                pass
            s.close()
    emu.kexec()
    with emu.open():
        pass


@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=PAGE - 1),
                  st.integers(min_value=0, max_value=255)),
        min_size=1, max_size=8),
)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_byte_damage(flips: List[Tuple[int, int, int]]) -> None:
    d = Damaged()
    pages = _kernel_pages(d.memory)
    for page_pick, offset, value in flips:
        pfn = pages[page_pick % len(pages)]
        d.write(pfn * PAGE + offset, bytes([value]))
    try:
        emu = d.boot()
    except KernelPanic:
        return
    exercise(emu)


@given(
    words=st.lists(
        st.tuples(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=PAGE // 8 - 1),
                  st.sampled_from([0, 1, 2, 51, 52, 63, 64, 2**32, 2**63, 2**64 - 1])),
        min_size=1, max_size=4),
    link=st.booleans(),
)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_word_damage(words: List[Tuple[int, int, int]], link: bool) -> None:
    # Whole u64 fields set to counts and addresses that sit at the edges:
    # block counts, next pointers aimed at other preserved pages.
    d = Damaged()
    pages = _kernel_pages(d.memory)
    for page_pick, slot, value in words:
        pfn = pages[page_pick % len(pages)]
        if link:
            value = pages[(page_pick // 7) % len(pages)] * PAGE
        d.u64(pfn * PAGE + slot * 8, value)
    try:
        emu = d.boot()
    except KernelPanic:
        return
    exercise(emu)


def test_every_page_zeroed_in_turn() -> None:
    base = Damaged()
    for pfn in _kernel_pages(base.memory):
        d = Damaged()
        d.write(pfn * PAGE, bytes(PAGE))
        try:
            emu = d.boot()
        except KernelPanic:
            continue
        exercise(emu)


def test_every_page_filled_with_ff_in_turn() -> None:
    base = Damaged()
    rng = random.Random(7)
    for pfn in _kernel_pages(base.memory):
        d = Damaged()
        d.write(pfn * PAGE + rng.randrange(0, 64) * 8, b"\xff" * 512)
        try:
            emu = d.boot()
        except KernelPanic:
            continue
        exercise(emu)
