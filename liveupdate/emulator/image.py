"""Image files: the preserved memory of a kexec, saved and loaded.

An image holds what one kernel hands the next: the KHO subtree table and
every preserved page (memfd pages included, read from their memfds when the
image is written). Booting from an image is booting from that memory alone.

Layout, version 1, all integers little-endian::

    offset  size
    0       8     magic  b"LUOEMUIM"
    8       4     version (1)
    12      4     page size (4096; KHO hands over between equal page sizes only)
    16      4     number of subtrees S
    20      4     reserved, 0
    24      8     number of pages P
    32      80*S  subtrees: name[64] (NUL-padded UTF-8), pa u64, size u64
    ...           P pages, in increasing pfn order:
                    pfn u64, length u32 (0..4096), reserved u32 (0),
                    data[length]  (the page's bytes; the rest of the page is 0)
    end-8   8     magic  b"LUOEMEND"

Loading checks the container only: magic, version, page size, counts
against the file's length, pfn order and range, lengths, the trailer, no
bytes after it. A file that fails is refused with OSError ENOEXEC (message
says why) before anything is allocated in proportion to its claims: a
corrupt image never hangs or exhausts memory. The *contents* of the pages
are not judged here: corrupted kernel state is the booting kernel's to find
(a failed boot, EIO at open, a failed retrieve), as on a real machine.

Writing is atomic: a temporary file in the same directory, fsync, rename,
fsync of the directory. An interrupted save leaves the previous image.
"""
from __future__ import annotations

import errno
import os
import struct
from typing import Dict, Iterator, List, Tuple, Union

from .._atomic import write_atomically
from .kho import MAX_PFN, PAGE_SIZE, Backing, FolioPage, Handover, PhysicalMemory

__all__ = ["save", "load", "dumps", "loads", "MAGIC", "VERSION"]

MAGIC = b"LUOEMUIM"
TRAILER = b"LUOEMEND"
VERSION = 1
_HEADER = struct.Struct("<8sIIIIQ")
_SUBTREE = struct.Struct("<64sQQ")
_PAGE = struct.Struct("<QII")

PathLike = Union[str, "os.PathLike[str]"]


def _bad(detail: str) -> OSError:
    return OSError(errno.ENOEXEC, f"not a usable emulator image: {detail}")


def _page_runs(pages: Dict[int, object]) -> Iterator[Tuple[int, bytes]]:
    """(pfn, 4096-or-fewer bytes) for every page, reading runs of one
    memfd's consecutive pages with a single pread."""
    pfns = sorted(pages)
    i = 0
    while i < len(pfns):
        pfn = pfns[i]
        page = pages[pfn]
        if isinstance(page, FolioPage):
            backing: Backing = page.backing
            j = i + 1
            while (j < len(pfns) and pfns[j] == pfns[j - 1] + 1 and isinstance(pages[pfns[j]], FolioPage)
                   and pages[pfns[j]].backing is backing  # type: ignore[attr-defined]
                   and pages[pfns[j]].index == pages[pfns[j - 1]].index + 1):  # type: ignore[attr-defined]
                j += 1
                if j - i >= 256:  # 1 MiB per read at most
                    break
            data = backing.read(page.index, j - i)
            for k in range(j - i):
                yield pfns[i + k], data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
            i = j
        else:
            yield pfn, bytes(page)  # type: ignore[call-overload]
            i += 1


def dumps(handover: Handover) -> bytes:
    """The image of ``handover`` as bytes."""
    parts: List[bytes] = [_HEADER.pack(MAGIC, VERSION, PAGE_SIZE, len(handover.subtrees), 0, len(handover.pages))]
    for name, (pa, size) in handover.subtrees.items():
        raw = name.encode("utf-8")
        if len(raw) > 63:
            raise ValueError(f"subtree name {name!r} is longer than 63 bytes")
        parts.append(_SUBTREE.pack(raw, pa, size))
    for pfn, data in _page_runs(handover.pages):
        data = data.rstrip(b"\0")
        parts.append(_PAGE.pack(pfn, len(data), 0))
        parts.append(data)
    parts.append(TRAILER)
    return b"".join(parts)


def save(path: PathLike, handover: Handover) -> None:
    """Write ``handover`` to ``path`` atomically (temporary file, fsync,
    rename, fsync of the directory): an interrupted save leaves the previous
    image."""
    write_atomically(os.fspath(path), dumps(handover))


def loads(data: bytes) -> PhysicalMemory:
    """A :class:`PhysicalMemory` whose handover is the image ``data``.
    Raises OSError ENOEXEC for anything but a well-formed image."""
    view = memoryview(data)
    if len(view) < _HEADER.size + len(TRAILER):
        raise _bad(f"{len(view)} bytes is shorter than an empty image")
    magic, version, page_size, nsub, reserved, npages = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise _bad(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise _bad(f"version {version}; this emulator reads version {VERSION}")
    if page_size != PAGE_SIZE:
        raise _bad(f"page size {page_size}; KHO hands over between equal page sizes ({PAGE_SIZE}) only")
    if reserved:
        raise _bad("reserved header field is not zero")
    if bytes(view[-len(TRAILER):]) != TRAILER:
        raise _bad("truncated (no end marker)")
    end = len(view) - len(TRAILER)
    if _HEADER.size + nsub * _SUBTREE.size + npages * _PAGE.size > end:
        raise _bad(f"claims {nsub} subtrees and {npages} pages, more than the file holds")
    offset = _HEADER.size
    subtrees: Dict[str, Tuple[int, int]] = {}
    for _ in range(nsub):
        raw, pa, size = _SUBTREE.unpack_from(view, offset)
        offset += _SUBTREE.size
        nul = raw.find(b"\0")
        try:
            name = (raw if nul < 0 else raw[:nul]).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"subtree name {raw!r} is not UTF-8") from None
        if not name or name in subtrees:
            raise _bad(f"empty or repeated subtree name {name!r}")
        subtrees[name] = (pa, size)
    pages: Dict[int, object] = {}
    last = 0
    for _ in range(npages):
        if offset + _PAGE.size > end:
            raise _bad("truncated page table")
        pfn, length, pad = _PAGE.unpack_from(view, offset)
        offset += _PAGE.size
        if pfn <= last or pfn > MAX_PFN:
            raise _bad(f"page frame {pfn:#x} out of order or out of range")
        if length > PAGE_SIZE or pad:
            raise _bad(f"page {pfn:#x} has a bad length {length}")
        if offset + length > end:
            raise _bad(f"page {pfn:#x} is truncated")
        pages[pfn] = bytearray(view[offset : offset + length])
        offset += length
        last = pfn
    if offset != end:
        raise _bad(f"{end - offset} unexpected bytes before the end marker")
    memory = PhysicalMemory()
    memory.pages = dict(pages)  # type: ignore[arg-type]
    memory.handover = Handover(pages, subtrees)  # type: ignore[arg-type]
    memory.next_pfn = max(memory.next_pfn, last + 1)
    return memory


def load(path: PathLike) -> PhysicalMemory:
    """Read an image file (see :func:`loads`). Raises OSError: ENOEXEC for
    a malformed image, or the errno of reading ``path``."""
    with open(os.fspath(path), "rb") as src:
        data = src.read()
    try:
        return loads(data)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} ({os.fspath(path)})") from None
