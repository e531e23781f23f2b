"""The bytes one emulated kernel hands the next, field by field.

The expected layouts are written out here from the kernel's ABI headers
(include/linux/kho/abi/{luo,block,memfd,kexec_handover}.h), independently of
the emulator's own struct definitions, and checked against the emulated
physical memory after a kexec. All integers are little-endian, all structs
``__packed``.
"""
from __future__ import annotations

import errno
import os
import struct
from typing import Any, Dict, List, Tuple

import pytest

from liveupdate import KernelPanic
from liveupdate.emulator import Emulator, PhysicalMemory, kho_block

PAGE = 4096
U64 = struct.Struct("<Q")

# struct luo_ser: char compatible[ALIGN(sizeof("luo-v5"), 8) = 8]; u64
# liveupdate_num; u64 sessions_pa; u64 flbs_pa.
ROOT_SIZE = 32
ROOT_COMPATIBLE = b"luo-v5\0\0"
# struct kho_block_header_ser: u64 next; u64 count.
HEADER_SIZE = 16
# struct luo_session_ser: char name[64]; struct luo_file_set_ser {u64
# files; u64 count}.
SESSION_SIZE = 80
# struct luo_file_ser: char compatible[48]; u64 data; u64 token.
FILE_SIZE = 64
FILE_COMPATIBLE = b"memfd-v2".ljust(48, b"\0")
# struct memfd_luo_ser: u64 pos; u64 size; u32 seals; u32 flags; u64
# nr_folios; struct kho_vmalloc {u64 first; unsigned int total_pages;
# unsigned short flags; unsigned short order}.
MEMFD_SIZE = 48
# struct memfd_luo_folio_ser: u64 pfn:52, flags:12; u64 index.
FOLIO_SIZE = 16
FOLIO_DIRTY, FOLIO_UPTODATE = 1, 2

# (PAGE_SIZE - sizeof(struct kho_block_header_ser)) / entry size
SESSIONS_PER_BLOCK = (PAGE - HEADER_SIZE) // SESSION_SIZE
FILES_PER_BLOCK = (PAGE - HEADER_SIZE) // FILE_SIZE

# KHO_MAX_BLOCKS in kernel/liveupdate/kho_block.c. kho_block_add() refuses
# a block once a set has 10,000 (-ENOSPC), and both callers grow the set to
# count + 1 *before* inserting (luo_session_insert(), luo_preserve_file()).
# So a set of 10,000 full blocks is the most there can be: 10,000 * 51 =
# 510,000 outgoing sessions, 10,000 * 63 = 630,000 files in one session;
# the 510,001st create_session and the 630,001st preserve fail with ENOSPC.
KHO_MAX_BLOCKS = 10_000
MAX_SESSIONS = KHO_MAX_BLOCKS * SESSIONS_PER_BLOCK
MAX_FILES = KHO_MAX_BLOCKS * FILES_PER_BLOCK


def test_derived_constants() -> None:
    assert (SESSIONS_PER_BLOCK, FILES_PER_BLOCK) == (51, 63)
    assert (MAX_SESSIONS, MAX_FILES) == (510_000, 630_000)
    assert kho_block.KHO_MAX_BLOCKS == KHO_MAX_BLOCKS


# -- reading the handover --------------------------------------------------

class Memory:
    """Raw reads of the emulated RAM as the next kernel finds it."""

    def __init__(self, emu: Emulator) -> None:
        # The pages as handed over: the booted kernel has since claimed and
        # freed some of them (the root, the session chain) in emu.memory.
        handover = emu.memory.handover
        self.mem = PhysicalMemory()
        self.mem.pages = handover.pages
        self.mem.folios = handover.folios  # memfd pages are kept in runs, apart
        self.subtrees: Dict[str, Tuple[int, int]] = dict(handover.subtrees)

    def read(self, pa: int, size: int) -> bytes:
        assert pa and pa % 8 == 0, f"bad physical address {pa:#x}"
        return self.mem.read(pa, size)

    def u64(self, pa: int) -> int:
        return U64.unpack(self.read(pa, 8))[0]

    def root(self) -> Tuple[bytes, int, int, int]:
        pa, size = self.subtrees["LUO"]
        assert size == ROOT_SIZE
        raw = self.read(pa, ROOT_SIZE)
        return raw[:8], U64.unpack_from(raw, 8)[0], U64.unpack_from(raw, 16)[0], U64.unpack_from(raw, 24)[0]

    def chain(self, head: int, entry_size: int) -> List[Tuple[int, int, List[bytes]]]:
        """[(block pa, count, [entry bytes])] following next pointers."""
        blocks = []
        pa = head
        while pa:
            assert pa % PAGE == 0, f"block {pa:#x} is not page aligned"
            assert len(blocks) < KHO_MAX_BLOCKS
            page = self.read(pa, PAGE)
            nxt, count = U64.unpack_from(page, 0)[0], U64.unpack_from(page, 8)[0]
            entries = [page[HEADER_SIZE + i * entry_size: HEADER_SIZE + (i + 1) * entry_size] for i in range(count)]
            # Slots past the count were never written: zero.
            tail = page[HEADER_SIZE + count * entry_size:]
            assert tail == bytes(len(tail)), f"block {pa:#x} has bytes past its {count} entries"
            blocks.append((pa, count, entries))
            pa = nxt
        return blocks

    def sessions(self) -> List[Tuple[bytes, int, int]]:
        _, _, head, _ = self.root()
        out = []
        for _, _, entries in self.chain(head, SESSION_SIZE):
            for raw in entries:
                out.append((raw[:64], U64.unpack_from(raw, 64)[0], U64.unpack_from(raw, 72)[0]))
        return out


def session_ser_name(name: str) -> bytes:
    return name.encode().ljust(64, b"\0")


def new_memfd(data: bytes = b"", flags: int = 0) -> int:
    fd = os.memfd_create("layout", flags)
    if data:
        os.write(fd, data)
    return fd


def kexec(emu: Emulator, *handles: Any) -> Memory:
    emu.kexec()
    for handle in handles:
        try:
            handle.close()
        except OSError:
            pass
    return Memory(emu)


# -- the root -----------------------------------------------------------------

def test_root_of_an_empty_handover() -> None:
    emu = Emulator()
    mem = kexec(emu)
    compatible, num, sessions_pa, flbs_pa = mem.root()
    assert compatible == ROOT_COMPATIBLE
    assert num == 1
    assert sessions_pa == 0  # no sessions: serialize leaves it 0
    assert flbs_pa % PAGE == 0


def test_liveupdate_number_counts_kexecs() -> None:
    emu = Emulator()
    assert emu.liveupdate_num == 0
    for n in range(1, 6):
        mem = kexec(emu)
        # The root a kernel hands over carries its own number + 1, which
        # is the number of the kernel booted from it.
        assert mem.root()[1] == n
        assert emu.liveupdate_num == n


def test_outgoing_root_before_reboot() -> None:
    # Written at late boot: number + 1, and sessions_pa 0 until the reboot
    # (luo_state_setup(), luo_session_serialize()).
    emu = Emulator()
    with emu.open() as dev:
        session = dev.create_session("not-yet")
        pa, size = emu.kernel.kho.subtrees["LUO"]
        raw = emu.memory.read(pa, ROOT_SIZE)
        assert size == ROOT_SIZE
        assert raw[:8] == ROOT_COMPATIBLE
        assert U64.unpack_from(raw, 8)[0] == 1
        assert U64.unpack_from(raw, 16)[0] == 0
        session.close()


# -- sessions -----------------------------------------------------------------

@pytest.mark.parametrize("count, shape", [
    (1, [1]),
    (51, [51]),
    (52, [51, 1]),
    (103, [51, 51, 1]),
])
def test_session_blocks(count: int, shape: List[int]) -> None:
    emu = Emulator()
    dev = emu.open()
    names = [f"session-{i:03d}" for i in range(count)]
    handles = [dev.create_session(name) for name in names]
    assert emu.kernel.sessions.outgoing.block_set.nblocks == len(shape)
    dev.close()
    mem = kexec(emu, *handles)
    head = mem.root()[2]
    blocks = mem.chain(head, SESSION_SIZE)
    assert [c for _, c, _ in blocks] == shape
    assert blocks[0][0] == head
    # Entries in creation order, names NUL-padded, no files.
    assert mem.sessions() == [(session_ser_name(n), 0, 0) for n in names]


def test_session_name_of_63_bytes_fills_the_field_but_its_nul() -> None:
    emu = Emulator()
    dev = emu.open()
    name = "é" * 31 + "z"
    s = dev.create_session(name)
    dev.close()
    mem = kexec(emu, s)
    raw_name = mem.sessions()[0][0]
    assert raw_name == name.encode() + b"\0"


def test_closed_sessions_are_not_handed_over() -> None:
    emu = Emulator()
    dev = emu.open()
    handles = [dev.create_session(f"s{i}") for i in range(60)]
    for h in handles[::2]:
        h.close()
    dev.close()
    mem = kexec(emu, *handles)
    assert [name for name, _, _ in mem.sessions()] == [session_ser_name(f"s{i}") for i in range(1, 60, 2)]
    assert [c for _, c, _ in mem.chain(mem.root()[2], SESSION_SIZE)] == [30]


def test_session_chain_grows_before_insert_and_shrinks_after_remove() -> None:
    emu = Emulator()
    dev = emu.open()
    bs = emu.kernel.sessions.outgoing.block_set
    handles = []
    expected = []
    for i in range(2 * SESSIONS_PER_BLOCK + 1):
        handles.append(dev.create_session(f"g{i}"))
        expected.append(bs.nblocks)
    # ceil(count / 51) after each insert.
    assert expected == [-(-(i + 1) // SESSIONS_PER_BLOCK) for i in range(len(handles))]
    # Blocks are linked in memory as they are added: next of each is the
    # following block, the last one's is 0; counts stay 0 until serialize.
    blocks = list(bs.blocks)
    for this, nxt in zip(blocks, blocks[1:] + [0]):
        assert U64.unpack(emu.memory.read(this, 8))[0] == nxt
        assert U64.unpack(emu.memory.read(this + 8, 8))[0] == 0
    remaining = len(handles)
    while handles:
        handles.pop().close()
        remaining -= 1
        assert bs.nblocks == -(-remaining // SESSIONS_PER_BLOCK)
    assert bs.head_pa == 0
    dev.close()


def full_block_then_a_refused_duplicate() -> "Tuple[Emulator, List[Any]]":
    """Exactly one block of sessions, then a create refused as a duplicate
    (luo_session_insert() grew the chain for it first); the device is closed,
    the sessions stay open."""
    emu = Emulator()
    with emu.open() as dev:
        handles = [dev.create_session(f"full-{i}") for i in range(SESSIONS_PER_BLOCK)]
        with pytest.raises(FileExistsError):
            dev.create_session("full-0")
    return emu, handles


def test_duplicate_name_at_a_full_block_leaves_an_empty_block_and_panics_next_boot() -> None:
    # luo_session_insert() grows the chain before it finds the duplicate and
    # does not shrink it back. With exactly 51 sessions the refused create
    # leaves block 2 empty; serialization never writes it (count 0), and
    # the next kernel's kho_block_set_restore() refuses a block with count
    # 0 -> luo_session_setup_incoming() fails -> luo_restore_fail() panics.
    # Seen on Linux 7.3 in the VM: "Kernel panic - not syncing: The incoming
    # tree failed to initialize properly [-EINVAL]" right after the kexec.
    emu, handles = full_block_then_a_refused_duplicate()
    assert emu.kernel.sessions.outgoing.block_set.nblocks == 2
    with pytest.raises(KernelPanic):
        emu.kexec()
    assert emu.kernel is None
    for h in handles:
        try:
            h.close()
        except OSError:
            pass


def test_duplicate_name_leak_is_repaired_by_the_next_remove() -> None:
    emu, handles = full_block_then_a_refused_duplicate()
    handles.pop().close()  # shrink(50): the empty block goes
    assert emu.kernel.sessions.outgoing.block_set.nblocks == 1
    mem = kexec(emu, *handles)
    assert [c for _, c, _ in mem.chain(mem.root()[2], SESSION_SIZE)] == [50]


# -- files ---------------------------------------------------------------------

@pytest.mark.parametrize("count, shape", [(1, [1]), (63, [63]), (64, [63, 1]), (127, [63, 63, 1])])
def test_file_blocks(count: int, shape: List[int]) -> None:
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("files")
    tokens = [(i * 7919) ^ 0xDEADBEEF00000000 for i in range(count)]
    for token in tokens:
        fd = new_memfd()
        s.preserve(fd, token)
        os.close(fd)
    dev.close()
    mem = kexec(emu, s)
    [(name, files_pa, files_count)] = mem.sessions()
    assert files_count == count
    blocks = mem.chain(files_pa, FILE_SIZE)
    assert [c for _, c, _ in blocks] == shape
    entries = [raw for _, _, block in blocks for raw in block]
    assert [U64.unpack_from(raw, 56)[0] for raw in entries] == tokens  # preservation order
    for raw in entries:
        assert raw[:48] == FILE_COMPATIBLE
        data = U64.unpack_from(raw, 48)[0]
        assert data and data % 8 == 0


def test_file_chain_grows_and_shrinks_back_on_failure() -> None:
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("grow")
    fs = emu.kernel.sessions.outgoing.sessions[b"grow"].file_set
    keep = []
    for token in range(FILES_PER_BLOCK):
        keep.append(new_memfd())
        s.preserve(keep[-1], token)
    assert fs.block_set.nblocks == 1
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        for bad, code in ((null, errno.ENOENT), (-1, errno.EBADF), (keep[0], errno.EBUSY)):
            with pytest.raises(OSError) as info:
                s.preserve(bad, 1000)
            assert info.value.errno == code
            # grown to 2 for the attempt, shrunk back after it failed
            assert fs.block_set.nblocks == 1
    finally:
        os.close(null)
    s.close()
    assert fs.block_set.nblocks == 0
    for fd in keep:
        os.close(fd)
    dev.close()


# -- memfd records ------------------------------------------------------------------

def memfd_record(mem: Memory, data_pa: int) -> Dict[str, Any]:
    raw = mem.read(data_pa, MEMFD_SIZE)
    pos, size, seals, flags, nr_folios = struct.unpack_from("<QQIIQ", raw)
    first, total_pages, vflags, order = struct.unpack_from("<QIHH", raw, 32)
    return dict(pos=pos, size=size, seals=seals, flags=flags, nr_folios=nr_folios, first=first,
                total_pages=total_pages, vflags=vflags, order=order, raw=raw)


def folio_array(mem: Memory, rec: Dict[str, Any]) -> List[Tuple[int, int, int]]:
    """The memfd_luo_folio_ser entries, through the kho_vmalloc chunk chain:
    each chunk a page {u64 next; u64 phys[511]} with a zero-terminated list."""
    phys: List[int] = []
    chunk = rec["first"]
    seen = set()
    while chunk:
        assert chunk not in seen and chunk % PAGE == 0
        seen.add(chunk)
        page = mem.read(chunk, PAGE)
        for i in range((PAGE - 8) // 8):
            p = U64.unpack_from(page, 8 + 8 * i)[0]
            if not p:
                break
            phys.append(p)
        chunk = U64.unpack_from(page, 0)[0]
    assert len(phys) == rec["total_pages"]
    table = b"".join(mem.read(p, PAGE) for p in phys)
    out = []
    for i in range(rec["nr_folios"]):
        word, index = struct.unpack_from("<QQ", table, i * FOLIO_SIZE)
        out.append((word & ((1 << 52) - 1), word >> 52, index))
    # Nothing past the last folio in the array's pages.
    rest = table[rec["nr_folios"] * FOLIO_SIZE:]
    assert rest == bytes(len(rest))
    return out


def test_memfd_record_and_folios() -> None:
    import fcntl

    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("memfd")
    content = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: 3 pages
    fd = new_memfd(content, os.MFD_ALLOW_SEALING)
    os.lseek(fd, 777, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    s.preserve(fd, 42)
    os.lseek(fd, 999, os.SEEK_SET)  # freeze records the position at reboot
    dev.close()
    mem = kexec(emu, s)
    [(_, files_pa, _)] = mem.sessions()
    [(_, _, [entry])] = mem.chain(files_pa, FILE_SIZE)
    rec = memfd_record(mem, U64.unpack_from(entry, 48)[0])
    assert rec["pos"] == 999
    assert rec["size"] == len(content)
    assert rec["seals"] == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
    assert rec["flags"] == 0
    assert rec["nr_folios"] == 3
    assert rec["first"] % PAGE == 0 and rec["first"]
    assert rec["total_pages"] == 1  # 3 * 16 bytes fit one page of the array
    folios = folio_array(mem, rec)
    assert [(flags, index) for _, flags, index in folios] == [(FOLIO_DIRTY | FOLIO_UPTODATE, i) for i in range(3)]
    for pfn, _, index in folios:
        assert pfn
        page = mem.read(pfn << 12, PAGE)
        assert page == content[index * PAGE:(index + 1) * PAGE].ljust(PAGE, b"\0")
    os.close(fd)


def test_empty_memfd_record_has_no_folios() -> None:
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("empty")
    fd = new_memfd()
    s.preserve(fd, 1)
    dev.close()
    mem = kexec(emu, s)
    [(_, files_pa, _)] = mem.sessions()
    [(_, _, [entry])] = mem.chain(files_pa, FILE_SIZE)
    rec = memfd_record(mem, U64.unpack_from(entry, 48)[0])
    # Size 0: nr_folios 0 and the kho_vmalloc left as allocated (zeroed).
    assert (rec["size"], rec["nr_folios"]) == (0, 0)
    assert rec["raw"][32:] == bytes(16)
    os.close(fd)


def test_sparse_memfd_pins_every_page() -> None:
    # memfd_pin_folios() allocates the holes: one folio per page of the size.
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("sparse")
    fd = new_memfd()
    os.ftruncate(fd, 5 * PAGE + 1)
    os.pwrite(fd, b"X", 3 * PAGE)
    s.preserve(fd, 1)
    dev.close()
    mem = kexec(emu, s)
    [(_, files_pa, _)] = mem.sessions()
    [(_, _, [entry])] = mem.chain(files_pa, FILE_SIZE)
    rec = memfd_record(mem, U64.unpack_from(entry, 48)[0])
    folios = folio_array(mem, rec)
    assert [index for _, _, index in folios] == list(range(6))
    assert all(pfn for pfn, _, _ in folios)
    assert mem.read(folios[3][0] << 12, 2) == b"X\0"
    os.close(fd)


def test_folio_array_spanning_two_pages() -> None:
    # 300 pages -> 4800 bytes of folio entries -> a vmalloc area of 2 pages.
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("big")
    fd = new_memfd()
    os.ftruncate(fd, 300 * PAGE)
    s.preserve(fd, 1)
    dev.close()
    mem = kexec(emu, s)
    [(_, files_pa, _)] = mem.sessions()
    [(_, _, [entry])] = mem.chain(files_pa, FILE_SIZE)
    rec = memfd_record(mem, U64.unpack_from(entry, 48)[0])
    assert rec["nr_folios"] == 300
    assert rec["total_pages"] == 2
    assert [index for _, _, index in folio_array(mem, rec)] == list(range(300))
    os.close(fd)


def test_session_entry_points_at_its_files() -> None:
    emu = Emulator()
    dev = emu.open()
    a, b, c = (dev.create_session(n) for n in ("a", "b", "c"))
    for token in range(3):
        fd = new_memfd(b"a%d" % token)
        a.preserve(fd, token)
        os.close(fd)
    fd = new_memfd(b"c")
    c.preserve(fd, 9)
    os.close(fd)
    dev.close()
    mem = kexec(emu, a, b, c)
    sessions = mem.sessions()
    assert [(n.rstrip(b"\0"), count) for n, _, count in sessions] == [(b"a", 3), (b"b", 0), (b"c", 1)]
    assert sessions[1][1] == 0  # no files: files pa 0
    assert sessions[0][1] != sessions[2][1]
    for _, files_pa, count in (sessions[0], sessions[2]):
        assert sum(c for _, c, _ in mem.chain(files_pa, FILE_SIZE)) == count


# -- the block cap -------------------------------------------------------------------

def test_session_cap_at_full_scale() -> None:
    """510,000 outgoing sessions fit, the 510,001st is ENOSPC (through the
    emulated kernel's session code; the fds of half a million session
    handles would only measure the host)."""
    emu = Emulator()
    sessions = emu.kernel.sessions
    for i in range(MAX_SESSIONS):
        sessions.create(b"s%d" % i)
    assert sessions.outgoing.block_set.nblocks == KHO_MAX_BLOCKS
    with pytest.raises(OSError) as info:
        sessions.create(b"one-too-many")
    assert info.value.errno == errno.ENOSPC
    # The grow comes before the duplicate check: a taken name is ENOSPC too.
    with pytest.raises(OSError) as info:
        sessions.create(b"s0")
    assert info.value.errno == errno.ENOSPC
    assert sessions.outgoing.block_set.nblocks == KHO_MAX_BLOCKS


def test_file_block_set_cap_at_full_scale() -> None:
    emu = Emulator()
    fs = kho_block.BlockSet(emu.kernel.kho, FILE_SIZE)
    fs.grow(MAX_FILES)
    assert fs.nblocks == KHO_MAX_BLOCKS
    with pytest.raises(OSError) as info:
        fs.grow(MAX_FILES + 1)
    assert info.value.errno == errno.ENOSPC
    assert fs.nblocks == KHO_MAX_BLOCKS
    fs.destroy()


@pytest.fixture
def small_cap(monkeypatch: Any) -> int:
    # The same rule with a cap of 3 blocks, through the public API.
    monkeypatch.setattr(kho_block, "KHO_MAX_BLOCKS", 3)
    return 3


def test_session_cap_through_the_api(small_cap: int) -> None:
    emu = Emulator()
    dev = emu.open()
    handles = [dev.create_session(f"c{i}") for i in range(small_cap * SESSIONS_PER_BLOCK)]
    with pytest.raises(OSError) as info:
        dev.create_session("over")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        dev.create_session("c0")
    assert info.value.errno == errno.ENOSPC
    handles.pop().close()
    handles.append(dev.create_session("over"))
    for h in handles:
        h.close()
    dev.close()


def test_file_cap_through_the_api(small_cap: int) -> None:
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("cap")
    fds = []
    for token in range(small_cap * FILES_PER_BLOCK):
        fds.append(new_memfd())
        s.preserve(fds[-1], token)
    extra = new_memfd()
    try:
        with pytest.raises(OSError) as info:
            s.preserve(extra, 10_000)
        assert info.value.errno == errno.ENOSPC
        # ENOSPC comes before the fd is looked at...
        with pytest.raises(OSError) as info:
            s.preserve(-1, 10_001)
        assert info.value.errno == errno.ENOSPC
        # ...and after the token check.
        with pytest.raises(OSError) as info:
            s.preserve(extra, 0)
        assert info.value.errno == errno.EEXIST
    finally:
        s.close()
        for fd in fds + [extra]:
            os.close(fd)
        dev.close()
