"""Kexec HandOver (KHO): emulated physical memory and what survives a kexec.

Two objects play two roles:

:class:`PhysicalMemory` is the machine's RAM. It is the only thing that
crosses an emulated kexec. Pages are addressed by page frame number; a
physical address is ``pfn << 12`` (non-zero and page-aligned). A page is
either kernel memory (``pages``: a ``bytearray`` of at most 4096 bytes
whose missing tail reads as zeros, so a 48-byte record costs 48 bytes, not
4 KiB, or a page of a memfd's folio array kept as the run of entries it
holds, :class:`~.folio_runs.FolioTablePage`) or a page of a memfd
(``folios``: runs of a memfd's own pages, :class:`~.folio_runs.FolioRun`,
reached through a file reference the memory holds; one byte per page says
whether it is still there). Reading memory that no page backs returns
zeros, as a deterministic stand-in for whatever garbage a real machine has
there. A 16 GiB memfd costs about 4 MiB here: the kernel's own record of it
is 64 MiB (16 bytes a page), and it pins 16 GiB of pages.

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
import struct
import weakref
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

from . import abi
from .folio_runs import FolioMap, FolioRun, FolioTablePage, ENTRIES_PER_PAGE
from .kfile import KernelFile

__all__ = ["PhysicalMemory", "FolioRun", "FolioTablePage", "Backing", "Handover", "KHO", "PAGE_SIZE", "FIRST_PFN"]

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
    (preserved, or handed over and not yet restored): every
    :class:`~.folio_runs.FolioRun` of the memfd holds this object, and the
    last one to go drops it. ``reusable`` is False for the memory an image
    was loaded into (one memfd for all its pages), which must never be
    handed out as a retrieved memfd."""

    __slots__ = ("file", "ino", "reusable", "__weakref__")

    def __init__(self, file: KernelFile, ino: Tuple[int, int], reusable: bool = True) -> None:
        self.file = file.get()
        self.ino = ino
        self.reusable = reusable
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


#: A kernel page: bytes (a bytearray whose missing tail reads as zeros) or
#: a page of a folio array kept as the run it describes.
Page = Union[bytearray, FolioTablePage]
#: What restore_folios() hands back, one per stretch of pages: a memfd's
#: pages (run, offset in it, count) or one kernel page.
Segment = Union[Tuple[FolioRun, int, int], Page]


class Handover:
    """What one kernel passes to the next: the preserved kernel pages, the
    preserved memfd pages (``folios``, in runs) and the KHO subtree table
    (name -> (physical address, size))."""

    __slots__ = ("pages", "subtrees", "folios")

    def __init__(self, pages: Optional[Dict[int, Page]] = None, subtrees: Optional[Dict[str, Tuple[int, int]]] = None,
                 folios: Optional[FolioMap] = None) -> None:
        self.pages: Dict[int, Page] = pages if pages is not None else {}
        self.subtrees: Dict[str, Tuple[int, int]] = subtrees if subtrees is not None else {}
        self.folios: FolioMap = folios if folios is not None else FolioMap()

    def page_count(self) -> int:
        """Kernel pages plus memfd pages handed over."""
        return len(self.pages) + self.folios.live_pages()

    def __repr__(self) -> str:
        names = ", ".join(f"{name}@{pa:#x}+{size}" for name, (pa, size) in self.subtrees.items())
        return f"<Handover {self.page_count()} preserved pages, subtrees: {names or 'none'}>"


class PhysicalMemory:
    """The emulated RAM: the one thing that survives an emulated kexec.

    ``read(pa, n)``/``write(pa, data)`` give byte access at any physical
    address (the REPL and the corruption tests use them); ``handover`` is
    what the running kernel booted from. :func:`liveupdate.emulator.walk`
    decodes it. ``pages`` holds the kernel pages, ``folios`` the memfd
    pages (in runs)."""

    def __init__(self) -> None:
        self.pages: Dict[int, Page] = {}
        self.folios = FolioMap()
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
        runs = handover.folios.copy()
        memory.folios = runs
        memory.handover = Handover(pages, dict(handover.subtrees), FolioMap(list(runs)))
        top = max((run.end for run in runs), default=0)
        memory.next_pfn = max(next_pfn, max(pages, default=0) + 1, top)
        return memory

    # -- allocation -------------------------------------------------------
    def alloc_pfns(self, count: int) -> int:
        """``count`` physically contiguous new pfns (never reused, so a stale
        physical address cannot alias a newer page)."""
        pfn = self.next_pfn
        if pfn + count > MAX_PFN:
            raise OSError(12, "emulated physical memory exhausted")  # ENOMEM
        self.next_pfn += count
        return pfn

    def alloc_pages(self, count: int = 1) -> int:
        """New zeroed kernel pages; returns the first pfn."""
        pfn = self.alloc_pfns(count)
        for i in range(count):
            self.pages[pfn + i] = bytearray()
        return pfn

    def free_page(self, pfn: int) -> None:
        self.pages.pop(pfn, None)

    def has_page(self, pfn: int) -> bool:
        """Whether anything (kernel page or memfd page) is at ``pfn``."""
        return pfn in self.pages or pfn in self.folios

    # -- byte access ------------------------------------------------------
    def page_bytes(self, pfn: int) -> bytes:
        """The 4096 bytes of page ``pfn`` (zeros where nothing is)."""
        page = self.pages.get(pfn)
        if page is not None:
            if isinstance(page, bytearray):
                return bytes(page).ljust(PAGE_SIZE, b"\0")
            return page.tobytes()
        hit = self.folios.page(pfn)
        if hit is None:
            return bytes(PAGE_SIZE)
        run, off = hit
        backing: Backing = run.backing
        return backing.read(run.index + off)

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

    def _writable(self, pfn: int) -> Optional[bytearray]:
        """The kernel page at ``pfn`` as bytes one can change (a folio array
        page kept as a run becomes bytes, in the handover record too)."""
        page = self.pages.get(pfn)
        if isinstance(page, FolioTablePage):
            raw = bytearray(page.tobytes())
            self.pages[pfn] = raw
            if self.handover.pages.get(pfn) is page:
                self.handover.pages[pfn] = raw
            return raw
        return page

    def write(self, pa: int, data: bytes) -> None:
        """Write ``data`` at ``pa``. Writing where no page is creates a
        kernel page there (it survives a kexec only if preserved)."""
        pfn, offset = divmod(pa, PAGE_SIZE)
        view = memoryview(bytes(data))
        while len(view):
            take = min(len(view), PAGE_SIZE - offset)
            page = self._writable(pfn)
            if page is None:
                hit = self.folios.page(pfn)
                if hit is not None:
                    run, off = hit
                    run.backing.write(run.index + off, offset, bytes(view[:take]))
                    view = view[take:]
                    pfn += 1
                    offset = 0
                    continue
                page = self.pages[pfn] = bytearray()
                self.next_pfn = max(self.next_pfn, pfn + 1)
            if len(page) < offset:
                page.extend(bytes(offset - len(page)))
            page[offset : offset + take] = view[:take]
            view = view[take:]
            pfn += 1
            offset = 0

    def read_u64(self, pa: int) -> int:
        value: int = abi.U64.unpack(self.read(pa, 8))[0]
        return value

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, abi.U64.pack(value))

    def __repr__(self) -> str:
        kernel, folios = len(self.pages), self.folios.live_pages()
        return f"<PhysicalMemory {kernel + folios} pages ({kernel} kernel, {folios} memfd folios), {self.handover!r}>"


def get_order(size: int) -> int:
    """The page order that holds ``size`` bytes (the kernel's get_order())."""
    pages = max(1, -(-size // PAGE_SIZE))
    return (pages - 1).bit_length()


class KHO:
    """One kernel's Kexec HandOver subsystem over a :class:`PhysicalMemory`.

    Outgoing: ``preserved`` kernel pages, ``preserved_runs`` of memfd pages
    and ``subtrees`` for the next kernel. Incoming: ``incoming`` kernel
    pages, the handover's memfd pages not yet restored (``incoming_folios``)
    and ``incoming_subtrees`` from the previous one."""

    #: The largest allocation kho_alloc_preserve() accepts (MAX_PAGE_ORDER 10).
    MAX_ORDER = 10

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.preserved: Set[int] = set()
        self.preserved_runs: Dict[int, FolioRun] = {}
        self.subtrees: Dict[str, Tuple[int, int]] = {}
        self.incoming: Set[int] = set(memory.handover.pages)
        self.incoming_folios: FolioMap = memory.handover.folios
        # memfd pages claimed as kernel pages (restore_pages on them: only a
        # corrupted record does that); they stay in memory, no longer incoming.
        self.claimed: Set[int] = set()
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

    def _folio_incoming(self, pfn: int) -> bool:
        return pfn in self.incoming_folios and pfn not in self.claimed

    def restore_pages(self, pa: int, count: int = 1) -> bool:
        """kho_restore_pages(): claim ``count`` incoming pages at ``pa`` for
        this kernel. False (nothing claimed) if any of them was not handed
        over, is misaligned, or was already restored."""
        if pa % PAGE_SIZE or count <= 0:
            return False
        pfn = pa >> PAGE_SHIFT
        if count == 1:
            if pfn in self.incoming:
                self.incoming.discard(pfn)
                return True
            if self._folio_incoming(pfn):
                self.claimed.add(pfn)
                return True
            return False
        kernel: List[int] = []
        folios: List[range] = []
        p, end = pfn, pfn + count
        # Stops at the first page that is not incoming: bounded by the
        # pages really handed over, whatever ``count`` claims.
        while p < end:
            if p in self.incoming:
                kernel.append(p)
                p += 1
                continue
            run = self.incoming_folios.find(p)
            if run is None:
                return False
            stop = min(end, run.end)
            if run.live.find(0, p - run.pfn, stop - run.pfn) >= 0:
                return False
            span = range(p, stop)
            if self.claimed and any(q in self.claimed for q in span):
                return False
            folios.append(span)
            p = stop
        self.incoming.difference_update(kernel)
        for span in folios:
            self.claimed.update(span)
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
    def pinned_pages(self) -> int:
        """memfd pages this machine holds pinned: preserved here, or handed
        over and not restored yet."""
        return self.memory.folios.live_pages()

    def preserve_folios(self, backing: Backing, count: int) -> int:
        """Preserve pages 0..count-1 of a memfd (pinned, as memfd_pin_folios
        does, holes included); returns the first pfn (they are contiguous)."""
        pfn = self.memory.alloc_pfns(count)
        run = FolioRun(pfn, count, backing)
        self.memory.folios.add(run)
        self.preserved_runs[pfn] = run
        return pfn

    def unpreserve_folios(self, pfn: int) -> None:
        """kho_unpreserve_folio() + unpin of every page preserved by the
        :meth:`preserve_folios` that returned ``pfn``: back to its memfd."""
        run = self.preserved_runs.pop(pfn, None)
        if run is not None:
            self.memory.folios.discard(run)

    def _drop_run(self, run: FolioRun) -> None:
        # Its last page restored: the memory and the handover record stop
        # holding the memfd.
        self.memory.folios.discard(run)
        self.incoming_folios.discard(run)

    def restore_folios(self, pfn: int, count: int) -> Tuple[int, List[Segment]]:
        """kho_restore_folio() of pfns ``pfn .. pfn + count - 1`` in order,
        stopping at the first that is not incoming: (how many were
        restored, what they are). Restored pages are the caller's and gone
        from the memory map."""
        done = 0
        out: List[Segment] = []
        p, end = pfn, pfn + count
        while p < end:
            if p in self.incoming:
                self.incoming.discard(p)
                page: Optional[Page] = self.memory.pages.pop(p, None)
                out.append(page if page is not None else bytearray())
                p += 1
                done += 1
                continue
            run = self.incoming_folios.find(p)
            if run is None:
                break
            a, b = p - run.pfn, min(end, run.end) - run.pfn
            stop = run.live.find(0, a, b)
            if stop < 0:
                stop = b
            if self.claimed:
                for q in range(run.pfn + a, run.pfn + stop):
                    if q in self.claimed:
                        stop = q - run.pfn
                        break
            if stop > a:
                run.live[a:stop] = bytes(stop - a)
                self.memory.folios.cleared(run, stop - a)
                if self.incoming_folios is not self.memory.folios:
                    self.incoming_folios.cleared(run, stop - a)
                run.nlive -= stop - a
                out.append((run, a, stop - a))
                done += stop - a
                if not run.nlive:
                    self._drop_run(run)
            if stop < b:
                break
            p = run.pfn + stop
        return done, out

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

    def vmalloc_folio_table(self, pfn: int, flags: int, count: int) -> List[int]:
        """A vmalloc area holding the ``count`` folio entries (pfn + i,
        flags, i): the same bytes as :meth:`vmalloc` of them, kept as one
        :class:`FolioTablePage` per page."""
        npages = max(1, -(-count // ENTRIES_PER_PAGE))
        first = self.memory.alloc_pfns(npages)
        pages = self.memory.pages
        for k in range(npages):
            done = k * ENTRIES_PER_PAGE
            pages[first + k] = FolioTablePage(pfn + done, flags, done, min(ENTRIES_PER_PAGE, count - done))
        return list(range(first, first + npages))

    def vfree(self, pfns: Iterable[int]) -> None:
        for pfn in pfns:
            self.memory.free_page(pfn)

    def preserve_vmalloc(self, pfns: List[int]) -> bytes:
        """kho_preserve_vmalloc(): preserve the area's pages and describe
        them in a chain of chunk pages; returns the 16-byte kho_vmalloc.

        A chunk is started as soon as the previous one is full, so an area
        of exactly 511 pages ends with an empty chunk, as in the kernel."""
        first = chunk = self.alloc_preserve(PAGE_SIZE)
        self.preserved.update(pfns)
        for start in range(0, len(pfns), abi.KHO_VMALLOC_SIZE):
            part = pfns[start : start + abi.KHO_VMALLOC_SIZE]
            self.memory.write(chunk + 8, struct.pack(f"<{len(part)}Q", *[pfn << PAGE_SHIFT for pfn in part]))
            if len(part) == abi.KHO_VMALLOC_SIZE:
                new = self.alloc_preserve(PAGE_SIZE)
                self.memory.write_u64(chunk, new)
                chunk = new
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

    def restore_vmalloc(self, desc: bytes) -> Optional[Tuple[List[Any], List[int]]]:
        """kho_restore_vmalloc(): the area's pages (each bytes of at most a
        page or a :class:`FolioTablePage`) and its (now owned) pfns, or None
        if the descriptor or a page of it does not check out."""
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
        memory = self.memory
        pages: List[Any] = []
        for pfn in pfns:
            page = memory.pages.get(pfn)
            pages.append(page if page is not None else memory.page_bytes(pfn))
        return pages, pfns

    # -- kexec --------------------------------------------------------------
    def pending_handover(self) -> Handover:
        """What :meth:`handover` would pass on, without changing anything:
        an image of it can be written (and fail) with this kernel intact."""
        memory = self.memory
        kept = {pfn: memory.pages[pfn] for pfn in sorted(self.preserved) if pfn in memory.pages}
        return Handover(kept, dict(self.subtrees), FolioMap(list(self.preserved_runs.values())))

    def handover(self, pending: Optional[Handover] = None) -> Handover:
        """Finish this kernel: the memory keeps only the preserved pages,
        which become the next kernel's incoming state."""
        memory = self.memory
        pending = pending if pending is not None else self.pending_handover()
        memory.pages = dict(pending.pages)
        memory.folios = FolioMap(list(pending.folios))
        memory.handover = pending
        self.preserved = set()
        self.preserved_runs = {}
        return memory.handover

    def __repr__(self) -> str:
        return (
            f"<KHO {len(self.preserved)} pages and {len(self.preserved_runs)} memfd runs preserved, "
            f"{len(self.incoming)} kernel pages incoming not restored, "
            f"subtrees out={sorted(self.subtrees)} in={sorted(self.incoming_subtrees)}>"
        )
