"""Kexec HandOver (KHO): emulated physical memory and what survives a kexec.

Two objects play two roles:

:class:`PhysicalMemory` is the machine's RAM. It is the only thing that
crosses an emulated kexec. Pages are addressed by page frame number; a
physical address is ``pfn << 12`` (non-zero and page-aligned). A page is
either kernel memory (a ``bytearray`` of at most 4096 bytes whose missing
tail reads as zeros, so a 48-byte record costs 48 bytes, not 4 KiB) or a
page of a memfd (:class:`FolioPage`: the memfd's own page, reached through a
file reference the memory holds). Reading memory that no page backs returns
zeros, as a deterministic stand-in for whatever garbage a real machine has
there.

:class:`KHO` is one kernel's KHO subsystem: it allocates and preserves
pages (``alloc_preserve``/``unpreserve_free``), preserves memfd folios and
vmalloc areas, registers named subtrees (the root entry ``"LUO"``), and in
the next kernel restores what was preserved (``restore_*``). A page can be
restored once: restoring clears its "preserved" mark, as the kernel clears
the page's KHO magic, so a cycle or a double reference in corrupted state
fails instead of looping.

At a kexec (:meth:`KHO.handover`) the memory keeps only the pages that were
preserved; everything else the old kernel owned is gone. The preserved set
and the subtree table form the :class:`Handover` the next kernel boots from.
memfd contents are not copied: a preserved folio stays the memfd's page,
exactly as a KHO-preserved folio stays where it is in RAM. Bytes are only
materialised when an image file is written (see :mod:`.image`).

The emulator uses order-0 folios only (the kernel may use larger folios for
big memfds; the serialized shape is the same, with one entry per page).
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

from . import abi
from .kfile import KernelFile

__all__ = ["PhysicalMemory", "FolioPage", "Backing", "Handover", "KHO", "PAGE_SIZE", "FIRST_PFN"]

log = logging.getLogger("liveupdate.emulator.kho")

PAGE_SIZE = abi.PAGE_SIZE
PAGE_SHIFT = abi.PAGE_SHIFT
#: Emulated RAM starts at 4 GiB so that addresses look like real ones and a
#: zero physical address can never be a valid page.
FIRST_PFN = 0x100000
#: pfns are 52-bit in memfd_luo_folio_ser.
MAX_PFN = (1 << abi.PFN_BITS) - 1


class Backing:
    """The pages of one preserved memfd, reached through a kept reference.

    The memory holds the reference while any of the memfd's pages is in it
    (preserved, or handed over and not yet restored); the last page to go
    drops it."""

    __slots__ = ("file", "ino", "__weakref__")

    def __init__(self, file: KernelFile, ino: Tuple[int, int]) -> None:
        self.file = file.get()
        self.ino = ino
        weakref.finalize(self, file.put)

    def read(self, index: int, count: int = 1) -> bytes:
        """``count`` pages from page ``index`` of the memfd, zero-padded
        where the file is shorter (holes and a truncated tail read as 0)."""
        want = count * PAGE_SIZE
        data = b""
        if self.file.alive:
            fd = self.file.borrow()
            try:
                data = os.pread(fd, want, index * PAGE_SIZE)
            finally:
                self.file.give_back(fd)
        return data if len(data) == want else data.ljust(want, b"\0")

    def write(self, index: int, offset: int, data: bytes) -> None:
        fd = self.file.borrow()
        try:
            os.pwrite(fd, data, index * PAGE_SIZE + offset)
        finally:
            self.file.give_back(fd)

    def __repr__(self) -> str:
        return f"<memfd pages of {self.file!r}>"


class FolioPage:
    """Physical page ``index`` of a memfd (an order-0 folio)."""

    __slots__ = ("backing", "index")

    def __init__(self, backing: Backing, index: int) -> None:
        self.backing = backing
        self.index = index

    def __repr__(self) -> str:
        return f"<folio {self.index} of {self.backing!r}>"


Page = Union[bytearray, FolioPage]


class Handover:
    """What one kernel passes to the next: the preserved pages and the KHO
    subtree table (name -> (physical address, size))."""

    __slots__ = ("pages", "subtrees")

    def __init__(self, pages: Optional[Dict[int, Page]] = None, subtrees: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
        self.pages: Dict[int, Page] = pages if pages is not None else {}
        self.subtrees: Dict[str, Tuple[int, int]] = subtrees if subtrees is not None else {}

    def __repr__(self) -> str:
        names = ", ".join(f"{name}@{pa:#x}+{size}" for name, (pa, size) in self.subtrees.items())
        return f"<Handover {len(self.pages)} preserved pages, subtrees: {names or 'none'}>"


class PhysicalMemory:
    """The emulated RAM: the one thing that survives an emulated kexec.

    ``read(pa, n)``/``write(pa, data)`` give byte access at any physical
    address (the REPL and the corruption tests use them); ``handover`` is
    what the running kernel booted from. :func:`liveupdate.emulator.walk`
    decodes it."""

    def __init__(self) -> None:
        self.pages: Dict[int, Page] = {}
        self.next_pfn = FIRST_PFN
        self.handover = Handover()

    @classmethod
    def from_handover(cls, handover: Handover, next_pfn: int = FIRST_PFN) -> "PhysicalMemory":
        """A machine whose RAM holds just ``handover`` (kernel pages copied,
        memfd pages shared), as if that handover had just happened."""
        memory = cls()
        pages = {pfn: bytearray(page) if isinstance(page, bytearray) else page
                 for pfn, page in handover.pages.items()}
        memory.pages = dict(pages)
        memory.handover = Handover(pages, dict(handover.subtrees))
        memory.next_pfn = max(next_pfn, max(pages, default=0) + 1)
        return memory

    # -- allocation -------------------------------------------------------
    def alloc_pfns(self, count: int) -> int:
        """``count`` physically contiguous new pfns (never reused, so a stale
        physical address cannot alias a newer page)."""
        pfn = self.next_pfn
        self.next_pfn += count
        if self.next_pfn > MAX_PFN:
            raise OSError(12, "emulated physical memory exhausted")  # ENOMEM
        return pfn

    def alloc_pages(self, count: int = 1) -> int:
        """New zeroed kernel pages; returns the first pfn."""
        pfn = self.alloc_pfns(count)
        for i in range(count):
            self.pages[pfn + i] = bytearray()
        return pfn

    def free_page(self, pfn: int) -> None:
        self.pages.pop(pfn, None)

    # -- byte access ------------------------------------------------------
    def page_bytes(self, pfn: int) -> bytes:
        """The 4096 bytes of page ``pfn`` (zeros where nothing is)."""
        page = self.pages.get(pfn)
        if page is None:
            return bytes(PAGE_SIZE)
        if isinstance(page, bytearray):
            return bytes(page).ljust(PAGE_SIZE, b"\0")
        return page.backing.read(page.index)

    def read(self, pa: int, size: int) -> bytes:
        """``size`` bytes at physical address ``pa``, across pages."""
        pfn, offset = divmod(pa, PAGE_SIZE)
        page = self.pages.get(pfn)
        if offset + size <= PAGE_SIZE and isinstance(page, bytearray):
            # The hot path: a record inside one kernel page.
            chunk = page[offset : offset + size]
            return bytes(chunk) if len(chunk) == size else bytes(chunk).ljust(size, b"\0")
        out = bytearray()
        while size > 0:
            take = min(size, PAGE_SIZE - offset)
            out += self.page_bytes(pfn)[offset : offset + take]
            size -= take
            pfn += 1
            offset = 0
        return bytes(out)

    def write(self, pa: int, data: bytes) -> None:
        """Write ``data`` at ``pa``. Writing where no page is creates a
        kernel page there (it survives a kexec only if preserved)."""
        pfn, offset = divmod(pa, PAGE_SIZE)
        view = memoryview(bytes(data))
        while len(view):
            take = min(len(view), PAGE_SIZE - offset)
            page = self.pages.get(pfn)
            if page is None:
                page = self.pages[pfn] = bytearray()
                self.next_pfn = max(self.next_pfn, pfn + 1)
            if isinstance(page, bytearray):
                if len(page) < offset:
                    page.extend(bytes(offset - len(page)))
                page[offset : offset + take] = view[:take]
            else:
                page.backing.write(page.index, offset, bytes(view[:take]))
            view = view[take:]
            pfn += 1
            offset = 0

    def read_u64(self, pa: int) -> int:
        return abi.U64.unpack(self.read(pa, 8))[0]

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, abi.U64.pack(value))

    def __repr__(self) -> str:
        kernel = sum(1 for page in self.pages.values() if isinstance(page, bytearray))
        return (
            f"<PhysicalMemory {len(self.pages)} pages ({kernel} kernel, {len(self.pages) - kernel} memfd folios), "
            f"{self.handover!r}>"
        )


def get_order(size: int) -> int:
    """The page order that holds ``size`` bytes (the kernel's get_order())."""
    pages = max(1, -(-size // PAGE_SIZE))
    return (pages - 1).bit_length()


class KHO:
    """One kernel's Kexec HandOver subsystem over a :class:`PhysicalMemory`.

    Outgoing: ``preserved`` pages and ``subtrees`` for the next kernel.
    Incoming: ``incoming`` pages and ``incoming_subtrees`` from the previous
    one, until restored."""

    #: The largest allocation kho_alloc_preserve() accepts (MAX_PAGE_ORDER 10).
    MAX_ORDER = 10

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.preserved: Set[int] = set()
        self.subtrees: Dict[str, Tuple[int, int]] = {}
        self.incoming: Set[int] = set(memory.handover.pages)
        self.incoming_subtrees: Dict[str, Tuple[int, int]] = dict(memory.handover.subtrees)

    # -- subtrees (the FDT nodes under the KHO root) -----------------------
    def add_subtree(self, name: str, pa: int, size: int) -> None:
        """kho_add_subtree(). Raises OSError EEXIST for a name already added."""
        if name in self.subtrees:
            raise OSError(17, f"KHO subtree {name!r} already added")
        self.subtrees[name] = (pa, size)

    def retrieve_subtree(self, name: str) -> Tuple[int, int]:
        """kho_retrieve_subtree(): (pa, size). Raises OSError ENOENT when the
        previous kernel passed no such subtree (or there was none)."""
        try:
            return self.incoming_subtrees[name]
        except KeyError:
            raise OSError(2, f"no incoming KHO subtree {name!r}") from None

    # -- kernel allocations ----------------------------------------------
    def alloc_preserve(self, size: int) -> int:
        """kho_alloc_preserve(): zeroed, preserved pages; returns their pa.
        Raises OSError EINVAL for size 0, E2BIG above the largest order."""
        if size <= 0:
            raise OSError(22, "kho_alloc_preserve of nothing")
        order = get_order(size)
        if order > self.MAX_ORDER:
            raise OSError(7, f"kho_alloc_preserve({size}) exceeds the largest page order")
        count = 1 << order
        pfn = self.memory.alloc_pages(count)
        self.preserved.update(range(pfn, pfn + count))
        return pfn << PAGE_SHIFT

    def unpreserve_free(self, pa: int, size: int = PAGE_SIZE) -> None:
        """kho_unpreserve_free(): the reverse of :meth:`alloc_preserve`."""
        pfn = pa >> PAGE_SHIFT
        for i in range(1 << get_order(size)):
            self.preserved.discard(pfn + i)
            self.memory.free_page(pfn + i)

    def restore_pages(self, pa: int, count: int = 1) -> bool:
        """kho_restore_pages(): claim ``count`` incoming pages at ``pa`` for
        this kernel. False (nothing claimed) if any of them was not handed
        over, is misaligned, or was already restored."""
        if pa % PAGE_SIZE or count <= 0 or count > len(self.incoming):
            return False
        pfn = pa >> PAGE_SHIFT
        span = range(pfn, pfn + count)
        if not all(p in self.incoming for p in span):
            return False
        self.incoming.difference_update(span)
        return True

    def restore_free(self, pa: int) -> bool:
        """kho_restore_free(): restore a kernel allocation and free it.
        A pa that was not handed over only warns, as in the kernel."""
        if not self.restore_pages(pa, 1):
            log.warning("kho_restore_free: %#x was not preserved by the previous kernel", pa)
            return False
        self.memory.free_page(pa >> PAGE_SHIFT)
        return True

    # -- memfd folios -----------------------------------------------------
    def preserve_folios(self, backing: Backing, count: int) -> int:
        """Preserve pages 0..count-1 of a memfd (pinned, as memfd_pin_folios
        does, holes included); returns the first pfn (they are contiguous)."""
        pfn = self.memory.alloc_pfns(count)
        pages = self.memory.pages
        for i in range(count):
            pages[pfn + i] = FolioPage(backing, i)
        self.preserved.update(range(pfn, pfn + count))
        return pfn

    def unpreserve_folio(self, pfn: int) -> None:
        """kho_unpreserve_folio() + unpin: the page goes back to its memfd."""
        self.preserved.discard(pfn)
        self.memory.free_page(pfn)

    def restore_folio(self, pa: int) -> Optional[Page]:
        """kho_restore_folio(): the incoming page at ``pa`` (now owned by the
        caller and gone from the memory map) or None."""
        if not self.restore_pages(pa, 1):
            return None
        pfn = pa >> PAGE_SHIFT
        # The page now belongs to a file of this kernel: the record of the
        # last handover stops holding its memfd open.
        if isinstance(self.memory.handover.pages.get(pfn), FolioPage):
            del self.memory.handover.pages[pfn]
        return self.memory.pages.pop(pfn, None) or bytearray()

    # -- vmalloc areas ----------------------------------------------------
    def vmalloc(self, data: bytes) -> List[int]:
        """An (unpreserved) vmalloc area holding ``data``; its page pfns."""
        count = max(1, -(-len(data) // PAGE_SIZE))
        pfns = []
        for i in range(count):
            pfn = self.memory.alloc_pages(1)
            self.memory.pages[pfn] = bytearray(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
            pfns.append(pfn)
        return pfns

    def vfree(self, pfns: Iterable[int]) -> None:
        for pfn in pfns:
            self.memory.free_page(pfn)

    def preserve_vmalloc(self, pfns: List[int]) -> bytes:
        """kho_preserve_vmalloc(): preserve the area's pages and describe
        them in a chain of chunk pages; returns the 16-byte kho_vmalloc.

        A chunk is started as soon as the previous one is full, so an area
        of exactly 511 pages ends with an empty chunk, as in the kernel."""
        first = chunk = self.alloc_preserve(PAGE_SIZE)
        idx = 0
        for pfn in pfns:
            self.preserved.add(pfn)
            self.memory.write_u64(chunk + 8 + 8 * idx, pfn << PAGE_SHIFT)
            idx += 1
            if idx == abi.KHO_VMALLOC_SIZE:
                new = self.alloc_preserve(PAGE_SIZE)
                self.memory.write_u64(chunk, new)
                chunk, idx = new, 0
        return abi.KHO_VMALLOC.pack(first, len(pfns), abi.KHO_VMALLOC_ALLOC, 0)

    def unpreserve_vmalloc(self, desc: bytes) -> None:
        """kho_unpreserve_vmalloc(): unpreserve the area's pages and free
        the chunk pages (the area itself stays allocated until vfree)."""
        chunk = abi.KHO_VMALLOC.unpack(desc)[0]
        seen = set()
        while chunk and chunk not in seen:
            seen.add(chunk)
            raw = self.memory.read(chunk, PAGE_SIZE)
            for i in range(abi.KHO_VMALLOC_SIZE):
                phys = abi.U64.unpack_from(raw, 8 + 8 * i)[0]
                if not phys:
                    break
                self.preserved.discard(phys >> PAGE_SHIFT)
            nxt = abi.U64.unpack_from(raw, 0)[0]
            self.unpreserve_free(chunk)
            chunk = nxt

    def restore_vmalloc(self, desc: bytes) -> Optional[Tuple[bytes, List[int]]]:
        """kho_restore_vmalloc(): the area's bytes and its (now owned) pfns,
        or None if the descriptor or a page of it does not check out."""
        first, total, flags, order = abi.KHO_VMALLOC.unpack(desc)
        if flags & ~abi.KHO_VMALLOC_SUPPORTED:
            return None
        contig = 1 << min(order, 63)
        pfns: List[int] = []
        chunk = first
        while chunk:
            raw = self.memory.read(chunk, PAGE_SIZE)
            for i in range(abi.KHO_VMALLOC_SIZE):
                phys = abi.U64.unpack_from(raw, 8 + 8 * i)[0]
                if not phys:
                    break
                if len(pfns) + contig > total:
                    return None
                if not self.restore_pages(phys, contig):
                    return None
                base = phys >> PAGE_SHIFT
                pfns.extend(range(base, base + contig))
            # The chunk page itself was preserved too; claiming it also ends
            # any cycle in a corrupted chain (a page restores only once).
            if not self.restore_pages(chunk, 1):
                return None
            self.memory.free_page(chunk >> PAGE_SHIFT)
            chunk = abi.U64.unpack_from(raw, 0)[0]
        if len(pfns) != total:
            return None
        data = b"".join(self.memory.page_bytes(pfn) for pfn in pfns)
        return data, pfns

    # -- kexec --------------------------------------------------------------
    def handover(self) -> Handover:
        """Finish this kernel: the memory keeps only the preserved pages,
        which become the next kernel's incoming state."""
        memory = self.memory
        kept = {pfn: memory.pages[pfn] for pfn in self.preserved if pfn in memory.pages}
        memory.pages = kept
        memory.handover = Handover(dict(kept), dict(self.subtrees))
        self.preserved = set()
        return memory.handover

    def __repr__(self) -> str:
        return (
            f"<KHO {len(self.preserved)} pages preserved, {len(self.incoming)} incoming not restored, "
            f"subtrees out={sorted(self.subtrees)} in={sorted(self.incoming_subtrees)}>"
        )
