"""memfd pages and folio arrays in runs: memory proportional to the kernel's.

The kernel keeps, for every page of a preserved memfd, one 16-byte
``memfd_luo_folio_ser`` record; the pages themselves are the memfd's. The
emulator keeps, for one preserve, one :class:`FolioRun` (pfns ``pfn ..
pfn + count - 1`` are pages ``index ..`` of one memfd) with one byte a page
saying whether the page is still in memory, and the folio array's vmalloc
pages as :class:`FolioTablePage` (a page of entries that continue one run,
which is what preserve writes: ``(pfn + i, flags, index + i)``), whose bytes
are made only when someone reads them. Every operation on them works on
whole runs (``bytes.find``, slice assignment, ``array``): no Python step per
page where pages come in runs. Irregular arrays (corrupted, or from a
version 1 image) are plain kernel pages, decoded entry by entry.

:func:`table_runs` reads a folio array, whatever its pages are, as runs of
entries ``(pfn, flags, index, count)``: consecutive pfns and indexes, equal
flags (a zero pfn is always a run of its own, since the kernel skips it).
"""
from __future__ import annotations

import bisect
import struct
import sys
from array import array
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union, overload

from . import abi

__all__ = ["FolioRun", "FolioMap", "FolioTablePage", "FolioTable", "table_runs", "run_bytes", "ENTRIES_PER_PAGE"]

PAGE_SIZE = abi.PAGE_SIZE
ENTRY = abi.FOLIO_SER.size
ENTRIES_PER_PAGE = PAGE_SIZE // ENTRY
_MASK = abi.PFN_MASK
_LITTLE = sys.byteorder == "little"
_PAIRS = struct.Struct("<QQ")
_U64_MAX = (1 << 64) - 1

#: A run of folio array entries: (pfn, flags, index, count).
Run = Tuple[int, int, int, int]


def run_bytes(pfn: int, flags: int, index: int, count: int) -> bytes:
    """The ``count`` entries (pfn + i, flags, index + i) as the kernel lays
    them out, made in C loops (``array``) rather than one pack per entry."""
    if count <= 0:
        return b""
    word = (pfn & _MASK) | ((flags & 0xFFF) << abi.PFN_BITS)
    out = array("Q", bytes(ENTRY * count))
    out[0::2] = array("Q", range(word, word + count))
    out[1::2] = array("Q", range(index, index + count))
    if not _LITTLE:
        out.byteswap()
    return out.tobytes()


class FolioTablePage:
    """One page of a folio array holding ``count`` entries that continue a
    run from (pfn, flags, index), zeros after them: 4096 bytes described in
    a few words, made into bytes on demand (:meth:`tobytes`)."""

    __slots__ = ("pfn", "flags", "index", "count")

    def __init__(self, pfn: int, flags: int, index: int, count: int) -> None:
        self.pfn = pfn
        self.flags = flags
        self.index = index
        self.count = count

    def tobytes(self) -> bytes:
        return run_bytes(self.pfn, self.flags, self.index, self.count).ljust(PAGE_SIZE, b"\0")

    def __len__(self) -> int:
        return PAGE_SIZE

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FolioTablePage):
            return (self.pfn, self.flags, self.index, self.count) == (other.pfn, other.flags, other.index,
                                                                        other.count)
        if isinstance(other, (bytes, bytearray)):
            return self.tobytes() == bytes(other).ljust(PAGE_SIZE, b"\0")
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<folio array page: {self.count} entries from pfn {self.pfn:#x} index {self.index}>"


class FolioRun:
    """pfns ``pfn .. pfn + count - 1`` are pages ``index ..`` of ``backing``
    (a :class:`.kho.Backing`). ``live[i]`` is 1 while page ``pfn + i`` is in
    memory (preserved, or handed over and not yet restored)."""

    __slots__ = ("pfn", "count", "backing", "index", "live", "nlive")

    def __init__(self, pfn: int, count: int, backing: Any, index: int = 0, live: Optional[bytearray] = None) -> None:
        self.pfn = pfn
        self.count = count
        self.backing = backing
        self.index = index
        self.live = live if live is not None else bytearray(b"\x01") * count
        self.nlive = self.live.count(1)

    @property
    def end(self) -> int:
        return self.pfn + self.count

    def segments(self) -> Iterator[Tuple[int, int]]:
        """(first pfn, count) of every stretch of live pages."""
        live, start = self.live, 0
        while True:
            first = live.find(1, start)
            if first < 0:
                return
            stop = live.find(0, first)
            if stop < 0:
                stop = self.count
            yield self.pfn + first, stop - first
            start = stop

    def copy(self) -> "FolioRun":
        return FolioRun(self.pfn, self.count, self.backing, self.index, bytearray(self.live))

    def __repr__(self) -> str:
        return f"<{self.nlive}/{self.count} memfd pages at pfn {self.pfn:#x}, from page {self.index} of {self.backing!r}>"


class FolioMap:
    """The runs of one memory (or of one handover), found by pfn in
    O(log runs). Removal is lazy so that finishing 100,000 small memfds is
    not quadratic: a removed run's start stays in the sorted list until
    half of them are dead."""

    __slots__ = ("_starts", "_runs", "_dead", "_live")

    def __init__(self, runs: "Sequence[FolioRun]" = ()) -> None:
        self._starts: List[int] = []
        self._runs: Dict[int, FolioRun] = {}
        self._dead = 0
        self._live = 0  # live pages of all runs, kept up to date (see cleared)
        for run in runs:
            self.add(run)

    def add(self, run: FolioRun) -> None:
        if run.pfn in self._runs:
            raise ValueError(f"a run at pfn {run.pfn:#x} exists")
        starts = self._starts
        if not starts or run.pfn > starts[-1]:
            starts.append(run.pfn)
        else:
            i = bisect.bisect_left(starts, run.pfn)
            if i < len(starts) and starts[i] == run.pfn:
                self._dead -= 1  # the start of a removed run, alive again
            else:
                starts.insert(i, run.pfn)
        self._runs[run.pfn] = run
        self._live += run.nlive

    def cleared(self, run: FolioRun, count: int) -> None:
        """``count`` pages of ``run`` left memory (its live bytes cleared)."""
        if self._runs.get(run.pfn) is run:
            self._live -= count

    def discard(self, run: FolioRun) -> None:
        if self._runs.get(run.pfn) is not run:
            return
        del self._runs[run.pfn]
        self._live -= run.nlive
        self._dead += 1
        if self._dead > 64 and self._dead * 2 > len(self._starts):
            self._starts = [s for s in self._starts if s in self._runs]
            self._dead = 0

    def find(self, pfn: int) -> Optional[FolioRun]:
        """The run holding ``pfn`` (live or not), or None."""
        i = bisect.bisect_right(self._starts, pfn) - 1
        if i < 0:
            return None
        # A removed run's start: no live run holds pfn either, since runs
        # never overlap and pfns are never reused (a run before it ends
        # before it).
        run = self._runs.get(self._starts[i])
        return run if run is not None and pfn < run.end else None

    def page(self, pfn: int) -> Optional[Tuple[FolioRun, int]]:
        """(run, offset) of the live page ``pfn``, or None."""
        run = self.find(pfn)
        if run is None:
            return None
        off = pfn - run.pfn
        return (run, off) if run.live[off] else None

    def __contains__(self, pfn: object) -> bool:
        return isinstance(pfn, int) and self.page(pfn) is not None

    def __iter__(self) -> Iterator[FolioRun]:
        for start in self._starts:
            run = self._runs.get(start)
            if run is not None:
                yield run

    def __len__(self) -> int:
        return len(self._runs)

    def live_pages(self) -> int:
        return self._live

    def copy(self) -> "FolioMap":
        """Another map of copies of the runs (same memfds, own live bytes)."""
        return FolioMap([run.copy() for run in self])

    def __repr__(self) -> str:
        return f"<FolioMap {len(self)} runs, {self.live_pages()} pages>"


def _is_run(raw: bytes, pfn: int, flags: int, index: int, count: int) -> bool:
    """Whether the first ``count`` entries of ``raw`` are the run from
    (pfn, flags, index): one comparison. A run that would leave the 52-bit
    pfn or the 64-bit index is none (a corrupted array may start there)."""
    return (bool(pfn) and pfn + count - 1 <= _MASK and index + count - 1 <= _U64_MAX
            and raw[: count * ENTRY] == run_bytes(pfn, flags, index, count))


def _decode_bytes(raw: bytes, count: int, out: List[Run]) -> None:
    """Entries of one plain page, appended to ``out`` as runs: a page that
    is one run is recognised with a single comparison."""
    if not count:
        return
    word, index = _PAIRS.unpack_from(raw, 0)
    pfn, flags = word & _MASK, word >> abi.PFN_BITS
    if _is_run(raw, pfn, flags, index, count):
        _append(out, pfn, flags, index, count)
        return
    for word, index in struct.iter_unpack("<QQ", raw[: count * ENTRY]):
        _append(out, word & _MASK, word >> abi.PFN_BITS, index, 1)


def _append(out: List[Run], pfn: int, flags: int, index: int, count: int) -> None:
    if out and pfn:
        p, f, i, n = out[-1]
        if p and f == flags and p + n == pfn and i + n == index:
            out[-1] = (p, f, i, n + count)
            return
    if not pfn and count > 1:
        out.extend([(0, flags, index + k, 1) for k in range(count)])
        return
    out.append((pfn, flags, index, count))


def table_runs(pages: Sequence[Any], nr: int) -> List[Run]:
    """The first ``nr`` entries of the folio array held by ``pages`` (in
    order; each a :class:`FolioTablePage`, or bytes of at most a page that
    read as zeros past their end) as runs."""
    out: List[Run] = []
    left = nr
    for page in pages:
        if left <= 0:
            break
        take = min(left, ENTRIES_PER_PAGE)
        if isinstance(page, FolioTablePage):
            n = min(take, page.count)
            if n:
                _append(out, page.pfn, page.flags, page.index, n)
            if take > n:
                _decode_bytes(bytes(ENTRY * (take - n)), take - n, out)
        else:
            raw = bytes(page)
            if len(raw) < take * ENTRY:
                raw = raw.ljust(take * ENTRY, b"\0")
            _decode_bytes(raw, take, out)
        left -= take
    return out


class FolioTable(Sequence):  # type: ignore[type-arg]
    """The (pfn, flags, index) entries of one folio array, as :func:`walk`
    shows them: a read-only sequence equal to the tuple of its entries,
    kept as pieces of at most a page (a run of entries, or the page's raw
    bytes when its entries are no run), so that it costs no more than the
    array itself and usually a few words."""

    __slots__ = ("_pieces", "_starts", "_len")

    def __init__(self, pages: Sequence[Any], nr: int) -> None:
        pieces: List[Union[Run, bytes]] = []
        starts: List[int] = []
        total, left = 0, nr
        for page in pages:
            if left <= 0:
                break
            take = min(left, ENTRIES_PER_PAGE)
            piece: Union[Run, bytes]
            if isinstance(page, FolioTablePage) and page.count >= take and page.pfn:
                piece = (page.pfn, page.flags, page.index, take)
            else:
                raw = (page.tobytes() if isinstance(page, FolioTablePage) else bytes(page))[: take * ENTRY]
                raw = raw.ljust(take * ENTRY, b"\0")
                word, index = _PAIRS.unpack_from(raw, 0)
                pfn = word & _MASK
                if _is_run(raw, pfn, word >> abi.PFN_BITS, index, take):
                    piece = (pfn, word >> abi.PFN_BITS, index, take)
                else:
                    piece = raw
            if isinstance(piece, tuple) and pieces and isinstance(pieces[-1], tuple):
                p, f, i, n = pieces[-1]
                if f == piece[1] and p + n == piece[0] and i + n == piece[2]:
                    pieces[-1] = (p, f, i, n + take)
                    total += take
                    left -= take
                    continue
            pieces.append(piece)
            starts.append(total)
            total += take
            left -= take
        self._pieces = pieces
        self._starts = starts
        self._len = total

    def runs(self) -> List[Run]:
        """The entries as runs (see :func:`table_runs`)."""
        out: List[Run] = []
        for piece in self._pieces:
            if isinstance(piece, tuple):
                _append(out, *piece)
            else:
                _decode_bytes(piece, len(piece) // ENTRY, out)
        return out

    def __len__(self) -> int:
        return self._len

    def _at(self, i: int) -> Tuple[int, int, int]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("folio index out of range")
        k = bisect.bisect_right(self._starts, i) - 1
        piece, off = self._pieces[k], i - self._starts[k]
        if isinstance(piece, tuple):
            return piece[0] + off, piece[1], piece[2] + off
        word, index = _PAIRS.unpack_from(piece, off * ENTRY)
        return word & _MASK, word >> abi.PFN_BITS, index

    @overload
    def __getitem__(self, i: int) -> Tuple[int, int, int]: ...

    @overload
    def __getitem__(self, i: slice) -> Tuple[Tuple[int, int, int], ...]: ...

    def __getitem__(self, i: Union[int, slice]) -> Any:
        if isinstance(i, slice):
            return tuple(self._at(k) for k in range(*i.indices(self._len)))
        return self._at(i)

    def __iter__(self) -> Iterator[Tuple[int, int, int]]:
        for piece in self._pieces:
            if isinstance(piece, tuple):
                pfn, flags, index, count = piece
                for off in range(count):
                    yield pfn + off, flags, index + off
            else:
                for word, index in struct.iter_unpack("<QQ", piece):
                    yield word & _MASK, word >> abi.PFN_BITS, index

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (FolioTable, tuple, list)):
            return len(other) == self._len and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))
