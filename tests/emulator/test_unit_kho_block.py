"""Unit tests of the emulator's block chain against the kernel's rules."""
from __future__ import annotations

import errno

import pytest

from liveupdate.emulator import abi, kho_block
from liveupdate.emulator.kho import KHO, PAGE_SIZE, PhysicalMemory
from liveupdate.emulator.kho_block import BlockSet


def handed_over(bs: BlockSet) -> KHO:
    """A new kernel's KHO over the memory ``bs`` preserved."""
    bs.kho.handover()
    return KHO(bs.kho.memory)


def test_capacity_per_block() -> None:
    assert kho_block.count_per_block(abi.SESSION_SER.size) == 51
    assert kho_block.count_per_block(abi.FILE_SER.size) == 63


def test_grow_before_insert_and_shrink_after_removal() -> None:
    bs = BlockSet(KHO(PhysicalMemory()), 64)
    bs.grow(1)
    assert bs.nblocks == 1
    bs.grow(63)
    assert bs.nblocks == 1
    bs.grow(64)
    assert bs.nblocks == 2
    assert bs.header(bs.blocks[0])[0] == bs.blocks[1]
    bs.shrink(64)
    assert bs.nblocks == 2
    bs.shrink(63)
    assert bs.nblocks == 1 and bs.header(bs.blocks[0])[0] == 0
    bs.shrink(0)
    assert bs.nblocks == 0 and bs.head_pa == 0


def test_block_cap_is_enospc_at_the_kernels_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kho_block, "KHO_MAX_BLOCKS", 5)
    kho = KHO(PhysicalMemory())
    bs = BlockSet(kho, 64)
    bs.grow(5 * 63)
    assert bs.nblocks == 5
    preserved = set(kho.preserved)
    with pytest.raises(OSError) as info:
        bs.grow(5 * 63 + 1)
    assert info.value.errno == errno.ENOSPC
    assert bs.nblocks == 5 and kho.preserved == preserved


def test_iterators_fill_then_read_back() -> None:
    bs = BlockSet(KHO(PhysicalMemory()), 80)
    bs.grow(120)
    it = bs.iterator()
    slots = [it.reserve_entry() for _ in range(120)]
    assert None not in slots
    assert [bs.header(pa)[1] for pa in bs.blocks] == [51, 51, 18]
    assert it.prev() == slots[-1]
    reader = bs.iterator()
    assert [reader.read_entry() for _ in range(120)] == slots
    assert reader.read_entry() is None
    assert list(bs.entries()) == slots
    assert list(BlockSet(KHO(PhysicalMemory()), 80).entries()) == []


def chain(n: int, counts: "list[int] | None" = None) -> "tuple[BlockSet, KHO]":
    bs = BlockSet(KHO(PhysicalMemory()), 64)
    bs.grow(n * 63)
    for pa, count in zip(bs.blocks, counts or [1] * n):
        bs._set_count(pa, count)
    return bs, handed_over(bs)


def test_restore_accepts_a_good_chain_and_frees_it() -> None:
    bs, kho = chain(3, [63, 63, 5])
    restored = BlockSet(kho, 64)
    restored.restore(bs.head_pa)
    assert restored.blocks == bs.blocks
    restored.destroy()
    assert not kho.incoming & {pa >> 12 for pa in bs.blocks}


@pytest.mark.parametrize("bad", [0, 64])
def test_restore_rejects_bad_counts(bad: int) -> None:
    bs, kho = chain(3, [63, bad, 1])
    with pytest.raises(OSError) as info:
        BlockSet(kho, 64).restore(bs.head_pa)
    assert info.value.errno == errno.EINVAL
    # Every block of the chain was given back.
    assert not kho.incoming & {pa >> 12 for pa in bs.blocks}


def test_restore_detects_a_cycle() -> None:
    bs, kho = chain(4)
    kho.memory.write_u64(bs.blocks[-1], bs.blocks[1])
    with pytest.raises(OSError) as info:
        BlockSet(kho, 64).restore(bs.head_pa)
    assert info.value.errno == errno.EINVAL


def test_restore_self_loop() -> None:
    bs, kho = chain(1)
    kho.memory.write_u64(bs.blocks[0], bs.blocks[0])
    with pytest.raises(OSError) as info:
        BlockSet(kho, 64).restore(bs.head_pa)
    assert info.value.errno == errno.EINVAL


def test_over_long_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    # Floyd's walk stops at the cap of iterations (2 blocks each): chains
    # up to twice the cap pass it and then overflow the set (ENOSPC);
    # longer ones are refused as corrupted (EINVAL).
    monkeypatch.setattr(kho_block, "KHO_MAX_BLOCKS", 10_000)
    bs = BlockSet(KHO(PhysicalMemory()), 64)
    monkeypatch.setattr(kho_block, "KHO_MAX_BLOCKS", 100)
    for n, expected in ((101, errno.ENOSPC), (200, errno.ENOSPC), (201, errno.EINVAL)):
        bs = BlockSet(KHO(PhysicalMemory()), 64)
        monkeypatch.setattr(kho_block, "KHO_MAX_BLOCKS", 10_000)
        bs.grow(n * 63)
        for pa in bs.blocks:
            bs._set_count(pa, 1)
        kho = handed_over(bs)
        monkeypatch.setattr(kho_block, "KHO_MAX_BLOCKS", 100)
        with pytest.raises(OSError) as info:
            BlockSet(kho, 64).restore(bs.head_pa)
        assert info.value.errno == expected, n


def test_chain_into_unpreserved_memory_is_einval() -> None:
    bs, kho = chain(2)
    kho.memory.write_u64(bs.blocks[-1], 0x7777000)  # nothing there: reads as zeros
    with pytest.raises(OSError) as info:
        BlockSet(kho, 64).restore(bs.head_pa)
    assert info.value.errno == errno.EINVAL


def test_clear_zeroes_counts_and_entries() -> None:
    bs = BlockSet(KHO(PhysicalMemory()), 64)
    bs.grow(70)
    it = bs.iterator()
    for _ in range(70):
        bs.kho.memory.write(it.reserve_entry(), b"\xff" * 64)  # type: ignore[arg-type]
    bs.clear()
    for pa in bs.blocks:
        assert bs.header(pa)[1] == 0
        assert bs.kho.memory.read(pa + 16, PAGE_SIZE - 16) == bytes(PAGE_SIZE - 16)
    assert bs.header(bs.blocks[0])[0] == bs.blocks[1]
