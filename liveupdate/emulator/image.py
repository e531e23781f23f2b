"""Image files: the preserved memory of a kexec, saved and loaded.

An image holds what one kernel hands the next: the KHO subtree table and
every preserved page (memfd pages included, read from their memfds when the
image is written). Booting from an image is booting from that memory alone.

Layout, version 2 (written), all integers little-endian::

    offset  size
    0       8     magic  b"LUOEMUIM"
    8       4     version (2)
    12      4     page size (4096; KHO hands over between equal page sizes only)
    16      4     number of subtrees S
    20      4     reserved, 0
    24      8     number of records R
    32      80*S  subtrees: name[64] (NUL-padded UTF-8), pa u64, size u64
    ...           R records, in increasing pfn order, none overlapping another:
                    pfn u64, count u32, kind u32, then by kind:
                    0 PAGE   one kernel page; count = length (0..4096),
                             data[length] (the rest of the page is 0)
                    1 TABLE  count pages of a memfd's folio array holding one
                             run of entries: first word u64 (pfn | flags<<52),
                             first index u64, entries u64, reserved u64 (0);
                             page k holds entries 256k.. (zeros after the last)
                    2 DATA   count memfd pages, data[count * 4096]
                    3 ZERO   count memfd pages that read as zeros, no data
    end-8   8     magic  b"LUOEMEND"

So a 16 GiB sparse memfd is a few records (about 100 bytes), not 4 million
pages. Version 1 (still read) has P pages instead of R records, each
``pfn u64, length u32, reserved u32 (0), data[length]``.

Both are written and read streaming: at most a MiB of page data in memory
at a time, whatever the image's size (:func:`save` writes through
:func:`liveupdate._atomic.atomic_writer`; :func:`load` copies memfd pages
into one memfd of the booted machine, holes left as holes).

Loading checks the container only: magic, version, page size, counts
against the file's length, pfn order and range, lengths, the trailer, no
bytes after it; an image whose pages are more than this machine's RAM is
refused (ENOMEM) before anything is allocated for them, and a folio array
must be no larger than its memfd pages need. A file that fails is refused
with OSError ENOEXEC (message says why): a corrupt image never hangs or
exhausts memory. A path that is not a regular file (a FIFO, a device such
as /dev/zero, a directory) is refused without blocking: ENOEXEC (EISDIR for
a directory). The *contents* of the pages are not judged here: corrupted
kernel state is the booting kernel's to find (a failed boot, EIO at open, a
failed retrieve), as on a real machine.

Writing is atomic: a temporary file in the same directory, fsync, rename,
fsync of the directory. An interrupted save leaves the previous image.
"""
from __future__ import annotations

import errno
import heapq
import io
import os
import stat
import struct
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .. import _atomic
from . import _host
from .folio_runs import ENTRIES_PER_PAGE, FolioMap, FolioRun, FolioTablePage
from .kfile import KernelFile
from .kho import MAX_PFN, PAGE_SIZE, Backing, Handover, PhysicalMemory

__all__ = ["save", "load", "dumps", "loads", "write", "MAGIC", "VERSION"]

MAGIC = b"LUOEMUIM"
TRAILER = b"LUOEMEND"
VERSION = 2
_HEADER = struct.Struct("<8sIIIIQ")
_SUBTREE = struct.Struct("<64sQQ")
_PAGE = struct.Struct("<QII")
_RECORD = struct.Struct("<QII")
_TABLE = struct.Struct("<QQQQ")
PAGE, TABLE, DATA, ZERO = 0, 1, 2, 3
#: Page data read or written at a time.
_CHUNK_PAGES = 256
_MAX_COUNT = 0xFFFFFFFF

PathLike = Union[str, "os.PathLike[str]"]
#: progress(done, total): pages written, or bytes read.
Progress = Callable[[int, int], None]


def _bad(detail: str) -> OSError:
    return OSError(errno.ENOEXEC, f"not a usable emulator image: {detail}")


# -- writing ----------------------------------------------------------------------

Record = Tuple[int, int, int, Any]  # (pfn, kind, count, payload)


def _kernel_records(pages: Dict[int, Any]) -> Iterator[Record]:
    """PAGE records, and TABLE records for runs of folio array pages."""
    pfns = sorted(pages)
    i = 0
    while i < len(pfns):
        pfn = pfns[i]
        page = pages[pfn]
        if not isinstance(page, FolioTablePage):
            yield pfn, PAGE, 0, bytes(page).rstrip(b"\0")
            i += 1
            continue
        # Pages that continue one run: full pages with consecutive pfns.
        j, entries, last = i + 1, page.count, page
        while (j < len(pfns) and pfns[j] == pfns[j - 1] + 1 and last.count == ENTRIES_PER_PAGE
               and j - i < _MAX_COUNT):
            nxt = pages[pfns[j]]
            if not (isinstance(nxt, FolioTablePage) and nxt.flags == page.flags and nxt.count
                    and nxt.pfn == last.pfn + last.count and nxt.index == last.index + last.count):
                break
            entries += nxt.count
            last = nxt
            j += 1
        word = page.pfn | (page.flags << 52)
        yield pfn, TABLE, j - i, _TABLE.pack(word, page.index, entries, 0)
        i = j


def _folio_records(folios: FolioMap, pages_done: List[int]) -> Iterator[Record]:
    """ZERO and DATA records of every memfd page handed over, read a MiB at
    a time; holes of the memfd are skipped without reading (SEEK_DATA)."""
    zero_page = bytes(PAGE_SIZE)
    for run in folios:
        for first, count in run.segments():
            src_page = run.index + (first - run.pfn)
            file = run.backing.file
            fd = file.borrow() if file.alive else -1
            try:
                pending_zero = 0
                pfn = first
                done = 0
                while done < count:
                    take = min(_CHUNK_PAGES, count - done)
                    offset = (src_page + done) * PAGE_SIZE
                    data = b""
                    if fd >= 0:
                        try:
                            data_at = os.lseek(fd, offset, os.SEEK_DATA)
                        except OSError as exc:
                            if exc.errno != errno.ENXIO:
                                raise
                            data_at = -1  # nothing but holes from here
                        if data_at < 0:
                            pending_zero += count - done
                            pages_done[0] += count - done
                            break
                        if data_at >= offset + take * PAGE_SIZE:
                            skip = min(count - done, (data_at - offset) // PAGE_SIZE)
                            pending_zero += skip
                            done += skip
                            pages_done[0] += skip
                            continue
                        data = os.pread(fd, take * PAGE_SIZE, offset)
                    if len(data) < take * PAGE_SIZE:
                        data = data.ljust(take * PAGE_SIZE, b"\0")
                    if data.count(0) == len(data):
                        pending_zero += take
                    else:
                        k = 0
                        while k < take:
                            if data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] == zero_page:
                                pending_zero += 1
                                k += 1
                                continue
                            m = k + 1
                            while m < take and data[m * PAGE_SIZE:(m + 1) * PAGE_SIZE] != zero_page:
                                m += 1
                            if pending_zero:
                                yield pfn, ZERO, pending_zero, None
                                pfn += pending_zero
                                pending_zero = 0
                            yield pfn, DATA, m - k, data[k * PAGE_SIZE:m * PAGE_SIZE]
                            pfn += m - k
                            k = m
                    done += take
                    pages_done[0] += take
                    while pending_zero > _MAX_COUNT:
                        yield pfn, ZERO, _MAX_COUNT, None
                        pfn += _MAX_COUNT
                        pending_zero -= _MAX_COUNT
                if pending_zero:
                    yield pfn, ZERO, pending_zero, None
            finally:
                if fd >= 0:
                    file.give_back(fd)


def write(out: Callable[[bytes], Any], patch: Callable[[int, bytes], Any], handover: Handover,
          progress: Optional[Progress] = None) -> int:
    """Write the image of ``handover`` through ``out`` (append) and
    ``patch`` (rewrite bytes at an offset: the record count, known at the
    end). Returns the number of bytes written."""
    written = 0

    def put(data: bytes) -> None:
        nonlocal written
        out(data)
        written += len(data)

    put(_HEADER.pack(MAGIC, VERSION, PAGE_SIZE, len(handover.subtrees), 0, 0))
    for name, (pa, size) in handover.subtrees.items():
        raw = name.encode("utf-8")
        if len(raw) > 63:
            raise ValueError(f"subtree name {name!r} is longer than 63 bytes")
        put(_SUBTREE.pack(raw, pa, size))
    total = handover.page_count()
    pages_done = [0]
    reported = 0
    records = 0
    merged = heapq.merge(_kernel_records(handover.pages), _folio_records(handover.folios, pages_done),
                         key=lambda record: record[0])
    for pfn, kind, count, payload in merged:
        if kind == PAGE:
            put(_RECORD.pack(pfn, len(payload), PAGE) + payload)
            pages_done[0] += 1
        elif kind == TABLE:
            put(_RECORD.pack(pfn, count, TABLE) + payload)
            pages_done[0] += count
        elif kind == DATA:
            put(_RECORD.pack(pfn, count, DATA))
            put(payload)
        else:
            put(_RECORD.pack(pfn, count, ZERO))
        records += 1
        if progress is not None and pages_done[0] - reported >= 1 << 16:
            reported = pages_done[0]
            progress(reported, total)
    put(TRAILER)
    patch(24, struct.pack("<Q", records))
    if progress is not None:
        progress(total, total)
    return written


def dumps(handover: Handover) -> bytes:
    """The image of ``handover`` as bytes (for small ones: tests, tools)."""
    buf = io.BytesIO()

    def patch(offset: int, data: bytes) -> None:
        buf.getbuffer()[offset:offset + len(data)] = data

    write(buf.write, patch, handover)
    return buf.getvalue()


def save(path: PathLike, handover: Handover, checkpoint: Optional[_atomic.Checkpoint] = None,
         progress: Optional[Progress] = None) -> None:
    """Write ``handover`` to ``path`` atomically and streaming (temporary
    file, fsync, rename, fsync of the directory): an interrupted save leaves
    the previous image. Raises OSError: ELOOP/EISDIR/EINVAL for a path that
    is a link or not a regular file, or the errno of the writes."""
    with _atomic.atomic_writer(os.fspath(path), checkpoint) as out:
        write(out.write, lambda offset, data: os.pwrite(out.fd, data, offset), handover, progress)


# -- reading ----------------------------------------------------------------------

class _Reader:
    """Sequential reads of exactly what the image says, with progress."""

    def __init__(self, src: BinaryIO, size: int, progress: Optional[Progress]) -> None:
        self.src = src
        self.size = size
        self.pos = 0
        self.progress = progress
        self._reported = 0

    def read(self, n: int, what: str) -> bytes:
        data = self.src.read(n)
        if len(data) != n:
            raise _bad(f"truncated {what}")
        self.pos += n
        if self.progress is not None and self.pos - self._reported >= 64 << 20:
            self._reported = self.pos
            self.progress(self.pos, self.size)
        return data


def _host_pages() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // PAGE_SIZE
    except (ValueError, OSError):
        return MAX_PFN


def _parse(src: BinaryIO, size: int, progress: Optional[Progress] = None) -> PhysicalMemory:
    if size < _HEADER.size + len(TRAILER):
        raise _bad(f"{size} bytes is shorter than an empty image")
    reader = _Reader(src, size, progress)
    magic, version, page_size, nsub, reserved, count = _HEADER.unpack(reader.read(_HEADER.size, "header"))
    if magic != MAGIC:
        raise _bad(f"bad magic {bytes(magic)!r}")
    if version not in (1, VERSION):
        raise _bad(f"version {version}; this emulator reads versions 1 and {VERSION}")
    if page_size != PAGE_SIZE:
        raise _bad(f"page size {page_size}; KHO hands over between equal page sizes ({PAGE_SIZE}) only")
    if reserved:
        raise _bad("reserved header field is not zero")
    # The end marker before the body: a truncated file is refused at once.
    src.seek(size - len(TRAILER))
    if src.read(len(TRAILER)) != TRAILER:
        raise _bad("truncated (no end marker)")
    src.seek(_HEADER.size)
    end = size - len(TRAILER)
    if _HEADER.size + nsub * _SUBTREE.size + count * _PAGE.size > end:
        raise _bad(f"claims {nsub} subtrees and {count} {'pages' if version == 1 else 'records'}, "
                   f"more than the file holds")
    subtrees: Dict[str, Tuple[int, int]] = {}
    for _ in range(nsub):
        raw, pa, sub_size = _SUBTREE.unpack(reader.read(_SUBTREE.size, "subtree table"))
        nul = raw.find(b"\0")
        try:
            name = (raw if nul < 0 else raw[:nul]).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"subtree name {raw!r} is not UTF-8") from None
        if not name or name in subtrees:
            raise _bad(f"empty or repeated subtree name {name!r}")
        subtrees[name] = (pa, sub_size)
    memory = PhysicalMemory()
    loader = _Loader(memory, reader, end)
    try:
        if version == 1:
            loader.v1_pages(count)
        else:
            loader.v2_records(count)
        if reader.pos != end:
            raise _bad(f"{end - reader.pos} unexpected bytes before the end marker")
        if reader.read(len(TRAILER), "end marker") != TRAILER:
            raise _bad("truncated (no end marker)")
    except BaseException:
        loader.discard()
        raise
    runs = loader.finish()
    memory.pages = dict(loader.pages)
    memory.folios = FolioMap(runs)
    memory.handover = Handover(loader.pages, subtrees, FolioMap(runs))
    memory.next_pfn = max(memory.next_pfn, loader.last + 1)
    return memory


class _Loader:
    """Builds the memory of an image: kernel pages in ``pages``, memfd
    pages in one memfd of this machine (``ram``), in runs."""

    def __init__(self, memory: PhysicalMemory, reader: _Reader, end: int) -> None:
        self.memory = memory
        self.reader = reader
        self.end = end
        self.pages: Dict[int, Any] = {}
        self.last = 0  # the last pfn taken (0: none yet)
        self.ram: Optional[KernelFile] = None
        self.ram_pages = 0
        self.spans: List[Tuple[int, int, int]] = []  # (pfn, count, first page in ram)
        self.table_pages = 0
        self.table_records = 0
        self.limit = _host_pages()

    def _take(self, pfn: int, count: int) -> None:
        if pfn <= self.last or pfn > MAX_PFN or count > MAX_PFN - pfn + 1:
            raise _bad(f"page frame {pfn:#x} (+{count}) out of order or out of range")
        self.last = pfn + count - 1

    def v1_pages(self, npages: int) -> None:
        for _ in range(npages):
            pfn, length, pad = _PAGE.unpack(self.reader.read(_PAGE.size, "page table"))
            self._take(pfn, 1)
            if length > PAGE_SIZE or pad:
                raise _bad(f"page {pfn:#x} has a bad length {length}")
            if self.reader.pos + length > self.end:
                raise _bad(f"page {pfn:#x} is truncated")
            self.pages[pfn] = bytearray(self.reader.read(length, f"page {pfn:#x}"))

    def v2_records(self, nrecords: int) -> None:
        for _ in range(nrecords):
            if self.reader.pos + _RECORD.size > self.end:
                raise _bad("truncated record table")
            pfn, count, kind = _RECORD.unpack(self.reader.read(_RECORD.size, "record"))
            if kind == PAGE:
                self._take(pfn, 1)
                if count > PAGE_SIZE:
                    raise _bad(f"page {pfn:#x} has a bad length {count}")
                if self.reader.pos + count > self.end:
                    raise _bad(f"page {pfn:#x} is truncated")
                self.pages[pfn] = bytearray(self.reader.read(count, f"page {pfn:#x}"))
            elif kind == TABLE:
                self._table(pfn, count)
            elif kind in (DATA, ZERO):
                self._folios(pfn, count, kind)
            else:
                raise _bad(f"record at page frame {pfn:#x} has an unknown kind {kind}")

    def _table(self, pfn: int, count: int) -> None:
        if self.reader.pos + _TABLE.size > self.end:
            raise _bad(f"folio array at {pfn:#x} is truncated")
        word, index, entries, reserved = _TABLE.unpack(self.reader.read(_TABLE.size, "folio array"))
        if not count or reserved or not (count - 1) * ENTRIES_PER_PAGE < entries <= count * ENTRIES_PER_PAGE:
            raise _bad(f"folio array at {pfn:#x}: {entries} entries do not fill {count} pages")
        first, flags = word & ((1 << 52) - 1), word >> 52
        if not first or first + entries - 1 > MAX_PFN or index + entries > 1 << 64:
            raise _bad(f"folio array at {pfn:#x} runs out of range")
        self._take(pfn, count)
        # A folio array costs an object per page here: no more of them than
        # the memfd pages of the image could need (checked at the end).
        self.table_pages += count
        self.table_records += 1
        if self.table_pages > self.limit // ENTRIES_PER_PAGE + self.table_records:
            raise _bad(f"folio arrays of {self.table_pages} pages, more than this machine's memory needs")
        for k in range(count):
            done = k * ENTRIES_PER_PAGE
            self.pages[pfn + k] = FolioTablePage(first + done, flags, index + done,
                                                 min(ENTRIES_PER_PAGE, entries - done))

    def _folios(self, pfn: int, count: int, kind: int) -> None:
        if not count:
            raise _bad(f"empty record at page frame {pfn:#x}")
        self._take(pfn, count)
        if self.ram_pages + count > self.limit:
            raise OSError(errno.ENOMEM, f"the image holds more than {self.ram_pages + count} memfd pages, more "
                                        f"than this machine's {self.limit} pages of RAM")
        if kind == DATA and self.reader.pos + count * PAGE_SIZE > self.end:
            raise _bad(f"pages at {pfn:#x} are truncated")
        if self.ram is None:
            self.ram = KernelFile(_host.kernel_fd(lambda: os.memfd_create("liveupdate-emulator:image-ram",
                                                                          os.MFD_CLOEXEC)))
        at = self.ram_pages
        if kind == DATA:
            fd = self.ram.fd
            done = 0
            while done < count:
                take = min(_CHUNK_PAGES, count - done)
                os.pwrite(fd, self.reader.read(take * PAGE_SIZE, f"pages at {pfn:#x}"), (at + done) * PAGE_SIZE)
                done += take
        self.ram_pages += count
        if self.spans and self.spans[-1][0] + self.spans[-1][1] == pfn:
            prev = self.spans[-1]
            self.spans[-1] = (prev[0], prev[1] + count, prev[2])
        else:
            self.spans.append((pfn, count, at))

    def finish(self) -> List[FolioRun]:
        if self.table_pages > self.ram_pages // ENTRIES_PER_PAGE + self.table_records:
            self.discard()
            raise _bad(f"folio arrays of {self.table_pages} pages for {self.ram_pages} memfd pages")
        if self.ram is None:
            return []
        os.ftruncate(self.ram.fd, self.ram_pages * PAGE_SIZE)
        st = os.fstat(self.ram.fd)
        backing = Backing(self.ram, (st.st_dev, st.st_ino), reusable=False)
        self.ram.put()  # the runs' backing holds the memfd now
        self.ram = None
        return [FolioRun(pfn, count, backing, at) for pfn, count, at in self.spans]

    def discard(self) -> None:
        if self.ram is not None:
            self.ram.put()
            self.ram = None


def loads(data: bytes) -> PhysicalMemory:
    """A :class:`PhysicalMemory` whose handover is the image ``data``.
    Raises OSError ENOEXEC for anything but a well-formed image."""
    return _parse(io.BytesIO(data), len(data))


def open_image(path: PathLike) -> Tuple[BinaryIO, int]:
    """Open an image file for reading without blocking on what is not a
    regular file: (file, size). Raises OSError: ENOEXEC for a FIFO, socket
    or device, EISDIR for a directory, or the errno of opening ``path``."""
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, f"{name} is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ENOEXEC, f"not a usable emulator image: {name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=1 << 20), st.st_size
    except BaseException:
        os.close(fd)
        raise


def load(path: PathLike, progress: Optional[Progress] = None) -> PhysicalMemory:
    """Read an image file streaming (see :func:`loads`). Raises OSError:
    ENOEXEC for a malformed image or a path that is not a regular file,
    EISDIR for a directory, ENOMEM for more pages than this machine has, or
    the errno of reading ``path``."""
    name = os.fspath(path)
    try:
        src, size = open_image(name)
        with src:
            return _parse(src, size, progress)
    except OSError as exc:
        detail = exc.strerror or str(exc)
        raise OSError(exc.errno, detail if name in detail else f"{detail} ({name})") from None
