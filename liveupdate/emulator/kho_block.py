"""KHO serialization blocks: the linked chain of page-sized blocks.

A block is one preserved page: a 16-byte header ``{next, count}`` (the
physical address of the next block, 0 at the end; the number of entries
written in this block) followed by up to ``(PAGE_SIZE - 16) // entry_size``
entries. With 4 KiB pages that is 51 sessions (80 bytes) or 63 files
(64 bytes) per block.

The outgoing side grows the chain *before* an insert so that serializing at
reboot never allocates (:meth:`BlockSet.grow`), and shrinks it after a
removal (:meth:`BlockSet.shrink`). A set never exceeds
:data:`KHO_MAX_BLOCKS` blocks: the block that would be the 10,001st fails
with ENOSPC. The incoming side (:meth:`BlockSet.restore`) refuses a chain
with a cycle or more than the cap (Floyd's check, bounded by the cap), a
block whose count is 0 or above its capacity (EINVAL), and frees whatever
it had claimed when it fails.

The iterators mirror the kernel's: :meth:`BlockSetIterator.reserve_entry`
(serialize: next free slot, moving to the next block when one is full, and
recording the count in the block header), :meth:`~BlockSetIterator.read_entry`
(deserialize: respect each header's count) and
:meth:`~BlockSetIterator.prev` (undo). Entries are physical addresses; the
caller reads and writes the entry bytes in memory there.

``KHO_MAX_BLOCKS`` is read at call time, so a test may lower it to reach
the cap without half a million sessions.
"""
from __future__ import annotations

import errno
import logging
from typing import Iterator, List, Optional, Tuple

from . import abi
from .kho import KHO, PAGE_SIZE

__all__ = ["KHO_MAX_BLOCKS", "BlockSet", "BlockSetIterator", "count_per_block"]

log = logging.getLogger("liveupdate.emulator.kho_block")

#: The kernel's safeguard on the length of one chain (40 MB of 4 KiB blocks).
KHO_MAX_BLOCKS = 10000

HEADER_SIZE = abi.BLOCK_HEADER.size


def count_per_block(entry_size: int) -> int:
    """Entries of ``entry_size`` bytes that fit in one block after its header."""
    return (PAGE_SIZE - HEADER_SIZE) // entry_size


class BlockSet:
    """One chain of blocks holding entries of one size (kho_block_set).

    ``blocks`` lists the physical addresses of the blocks in chain order;
    ``head_pa`` is the first one (0 when empty); ``incoming`` is set by
    :meth:`restore` (blocks then belong to the previous kernel and are given
    back with restore_free instead of unpreserve_free)."""

    __slots__ = ("kho", "entry_size", "count_per_block", "blocks", "head_pa", "incoming")

    def __init__(self, kho: KHO, entry_size: int) -> None:
        self.kho = kho
        self.entry_size = entry_size
        self.count_per_block = count_per_block(entry_size)
        # A shared empty tuple until the first block: most sets of a big
        # kernel (empty sessions) never get one, and every list costs.
        self.blocks: "List[int] | Tuple[int, ...]" = ()
        self.head_pa = 0
        self.incoming = False

    @property
    def nblocks(self) -> int:
        return len(self.blocks)

    def capacity(self) -> int:
        return len(self.blocks) * self.count_per_block

    # -- header access ------------------------------------------------------
    def header(self, pa: int) -> "tuple[int, int]":
        """(next, count) of the block at ``pa``."""
        return abi.BLOCK_HEADER.unpack(self.kho.memory.read(pa, HEADER_SIZE))

    def _set_next(self, pa: int, nxt: int) -> None:
        self.kho.memory.write_u64(pa, nxt)

    def _set_count(self, pa: int, count: int) -> None:
        self.kho.memory.write_u64(pa + 8, count)

    # -- one block ----------------------------------------------------------
    def _free_ser(self, pa: int) -> None:
        if self.incoming:
            self.kho.restore_free(pa)
        else:
            self.kho.unpreserve_free(pa)

    def _add(self, pa: int) -> None:
        if len(self.blocks) >= KHO_MAX_BLOCKS:
            raise OSError(errno.ENOSPC, f"a block set holds at most {KHO_MAX_BLOCKS} blocks")
        if self.blocks:
            self._set_next(self.blocks[-1], pa)
        else:
            self.head_pa = pa
        if isinstance(self.blocks, tuple):
            self.blocks = [pa]
        else:
            self.blocks.append(pa)

    def _grow_one(self) -> None:
        if self.incoming:
            log.warning("kho_block: allocating a block in an incoming set")
        pa = self.kho.alloc_preserve(PAGE_SIZE)
        try:
            self._add(pa)
        except OSError:
            self._free_ser(pa)
            raise

    def _shrink_one(self) -> None:
        if not self.blocks:
            return
        last = self.blocks.pop()  # type: ignore[union-attr]
        self._free_ser(last)
        if self.blocks:
            self._set_next(self.blocks[-1], 0)
        else:
            self.head_pa = 0

    # -- the kernel's API ---------------------------------------------------
    def grow(self, count: int) -> None:
        """Add blocks until ``count`` entries fit (kho_block_set_grow).

        Raises OSError: EINVAL on an incoming set; ENOSPC past the block cap
        (the set is then as it was before the call)."""
        if self.incoming:
            raise OSError(errno.EINVAL, "cannot grow a block set restored from the previous kernel")
        before = len(self.blocks)
        try:
            while count > len(self.blocks) * self.count_per_block:
                self._grow_one()
        except OSError:
            while len(self.blocks) > before:
                self._shrink_one()
            raise

    def shrink(self, count: int) -> None:
        """Drop trailing blocks the first ``count`` entries do not need
        (kho_block_set_shrink)."""
        while self.blocks and count <= (len(self.blocks) - 1) * self.count_per_block:
            self._shrink_one()

    def _is_cyclic(self) -> bool:
        # Floyd's tortoise and hare, bounded by the block cap so a long
        # corrupted chain ends the walk as surely as a cycle does.
        read_next = self.kho.memory.read_u64
        fast = slow = self.head_pa
        steps = 0
        while fast:
            if steps >= KHO_MAX_BLOCKS:
                log.error("kho_block: block set is corrupted (too long)")
                return True
            steps += 1
            nxt = read_next(fast)
            if not nxt:
                break
            fast = nxt
            nxt = read_next(fast)
            if not nxt:
                break
            fast = nxt
            slow = read_next(slow)
            if slow == fast:
                log.error("kho_block: block set is corrupted (cycle)")
                return True
        return False

    def restore(self, head_pa: int) -> None:
        """Adopt the chain the previous kernel left at ``head_pa``
        (kho_block_set_restore). ``head_pa`` 0 is an empty set.

        Raises OSError: EINVAL for a cycle, an over-long chain or a block
        whose count is 0 or above capacity; ENOSPC if more than the cap of
        blocks is linked. On failure every block of the chain is freed."""
        self.incoming = True
        if not head_pa:
            return
        self.head_pa = head_pa
        if self._is_cyclic():
            self.head_pa = 0
            raise OSError(errno.EINVAL, f"block chain at {head_pa:#x} has a cycle or is too long")
        next_pa = head_pa
        try:
            while next_pa:
                nxt, count = self.header(next_pa)
                if not count or count > self.count_per_block:
                    log.warning("kho_block: block %#x has an invalid entry count %d", next_pa, count)
                    raise OSError(
                        errno.EINVAL,
                        f"block at {next_pa:#x} holds {count} entries (1 to {self.count_per_block} allowed)",
                    )
                self._add(next_pa)
                next_pa = nxt
        except OSError:
            self.destroy()
            # Give back the rest of the chain that was never adopted.
            while next_pa:
                nxt = self.kho.memory.read_u64(next_pa)
                self._free_ser(next_pa)
                next_pa = nxt
            raise

    def destroy(self) -> None:
        """Free every block (kho_block_set_destroy)."""
        for pa in self.blocks:
            self._free_ser(pa)
        self.blocks = ()
        self.head_pa = 0

    def clear(self) -> None:
        """Zero every block's count and entries (kho_block_set_clear)."""
        blank = bytes(PAGE_SIZE - 8)
        for pa in self.blocks:
            self.kho.memory.write(pa + 8, blank)

    def iterator(self) -> "BlockSetIterator":
        return BlockSetIterator(self)

    def entries(self) -> "Iterator[int]":
        """The pa of every written entry, first to last: the read loop of
        the restore paths (kho_block_read_entry until it returns NULL)."""
        it = BlockSetIterator(self)
        entry = it.read_entry()
        while entry is not None:
            yield entry
            entry = it.read_entry()

    def __repr__(self) -> str:
        state = "incoming" if self.incoming else "outgoing"
        return (
            f"<BlockSet {state} {len(self.blocks)} blocks x {self.count_per_block} entries of "
            f"{self.entry_size} bytes, head={self.head_pa:#x}>"
        )


class BlockSetIterator:
    """Position in a :class:`BlockSet` (kho_block_set_it): the current block
    (an index into ``bs.blocks``, or None when the set is empty) and the
    entry index ``i`` inside it."""

    __slots__ = ("bs", "block", "i")

    def __init__(self, bs: BlockSet) -> None:
        self.bs = bs
        self.block: Optional[int] = 0 if bs.blocks else None
        self.i = 0

    def _entry(self, index: int) -> int:
        return self.bs.blocks[self.block] + HEADER_SIZE + index * self.bs.entry_size  # type: ignore[index]

    def reserve_entry(self) -> Optional[int]:
        """The pa of the next free slot (recording the new count in the
        block header), or None when every block is full."""
        bs = self.bs
        if self.block is None:
            return None
        if self.i == bs.count_per_block:
            if self.block == len(bs.blocks) - 1:
                return None
            self.block += 1
            self.i = 0
        entry = self._entry(self.i)
        self.i += 1
        bs._set_count(bs.blocks[self.block], self.i)
        return entry

    def read_entry(self) -> Optional[int]:
        """The pa of the next written entry, or None after the last."""
        bs = self.bs
        if self.block is None:
            return None
        if self.i == bs.header(bs.blocks[self.block])[1]:
            if self.block == len(bs.blocks) - 1:
                return None
            self.block += 1
            self.i = 0
        entry = self._entry(self.i)
        self.i += 1
        return entry

    def prev(self) -> Optional[int]:
        """Step back one slot (to the end of the previous block when at the
        start of one); the pa of that slot, or None at the very start."""
        bs = self.bs
        if self.block is None:
            return None
        if self.i == 0:
            if self.block == 0:
                return None
            self.block -= 1
            self.i = bs.count_per_block
        self.i -= 1
        return self._entry(self.i)
