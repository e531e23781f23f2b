"""Walk preserved memory: decode what one kernel handed the next.

``walk(source)`` takes an :class:`~liveupdate.emulator.Emulator` (its last
handover), a :class:`~.kho.PhysicalMemory` (e.g. from
``image.load(path)``, no boot needed) or a :class:`~.kho.Handover`, and
yields records in memory order of discovery::

    Subtree("LUO", pa, size)
    Root(pa, compatible, liveupdate_num, sessions_pa, flbs_pa)
    Block("sessions", 0, pa, next, count, capacity)
    Session(pa, name, files_pa, files_count)
    Block("files of 'name'", 0, pa, next, count, capacity)
    File(pa, session, compatible, token, data)
    Memfd(pa, token, pos, size, seals, flags, nr_folios, folios)
    ...
    Problem(where, message)   # whatever does not check out, instead of raising

It never raises for corrupted contents and never loops, and its work is
bounded by the memory it decodes: every page is visited once. Chains stop at
a page seen before or after the kernel's block cap; a block, a memfd record
or a folio array page that another record already reached (sessions sharing
one files chain, files sharing one memfd record: what the kernel refuses,
since a page restores only once) is reported as a Problem, not decoded
again. ``Memfd.folios`` is a :class:`~.folio_runs.FolioTable`: equal to the
tuple of (pfn, flags, index) entries, kept as runs. Example (REPL)::

    >>> for record in liveupdate.emulator.walk(emu): print(record)
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, NamedTuple, Set, Tuple, Union

from . import abi, file_handler, kho_block
from .file_handler import Problem
from .kho import PAGE_SHIFT, Handover, PhysicalMemory
from .memfd_luo import Memfd

__all__ = ["walk", "Subtree", "Root", "Block", "Session", "File", "Memfd", "Problem"]


class Subtree(NamedTuple):
    name: str
    pa: int
    size: int


class Root(NamedTuple):
    pa: int
    compatible: bytes
    liveupdate_num: int
    sessions_pa: int
    flbs_pa: int


class Block(NamedTuple):
    chain: str
    index: int
    pa: int
    next: int
    count: int
    capacity: int


class Session(NamedTuple):
    pa: int
    name: bytes
    files_pa: int
    files_count: int


class File(NamedTuple):
    pa: int
    session: bytes
    compatible: bytes
    token: int
    data: int


#: Records of the walk itself; a file's handler adds its own (memfd: Memfd).
Record = Union[Subtree, Root, Block, Session, File, Memfd, Problem, Any]


def _memory_of(source: object) -> Tuple[PhysicalMemory, Handover]:
    handover = getattr(source, "memory", source)
    if isinstance(handover, PhysicalMemory):
        handover = handover.handover
    if not isinstance(handover, Handover):
        raise TypeError(f"walk() takes an Emulator, a PhysicalMemory or a Handover, not {type(source).__name__}")
    view = PhysicalMemory()
    # Read-only use: the handover's pages as handed over.
    view.pages = handover.pages
    view.folios = handover.folios
    return view, handover


def _chain(memory: PhysicalMemory, head: int, entry_size: int, label: str,
           out: List[Record], visited: Dict[int, str]) -> List[int]:
    """Blocks of a chain (appended to ``out``); the entries' addresses.
    ``visited``: the pages of the whole walk so far, and who reached them."""
    capacity = kho_block.count_per_block(entry_size)
    entries: List[int] = []
    seen: Set[int] = set()
    pa, index = head, 0
    while pa:
        if pa in seen:
            out.append(Problem(label, f"cycle: block {index} links back to {pa:#x}"))
            break
        if index >= kho_block.KHO_MAX_BLOCKS:
            out.append(Problem(label, f"longer than the {kho_block.KHO_MAX_BLOCKS}-block cap"))
            break
        owner = visited.get(pa >> PAGE_SHIFT)
        if owner is not None:
            out.append(Problem(label, f"block {index} at {pa:#x} is a page of {owner} too (a page restores "
                                      f"only once): not decoded again"))
            break
        visited[pa >> PAGE_SHIFT] = label
        seen.add(pa)
        if not memory.has_page(pa >> PAGE_SHIFT):
            out.append(Problem(label, f"block {index} at {pa:#x} is not preserved memory"))
        nxt, count = abi.BLOCK_HEADER.unpack(memory.read(pa, abi.BLOCK_HEADER.size))
        out.append(Block(label, index, pa, nxt, count, capacity))
        if not count or count > capacity:
            out.append(Problem(label, f"block {index} at {pa:#x} holds {count} entries (1 to {capacity} allowed)"))
        for i in range(min(count, capacity)):
            entries.append(pa + abi.BLOCK_HEADER.size + i * entry_size)
        pa, index = nxt, index + 1
    return entries


def walk(source: object) -> Iterator[Record]:
    """Decode the handover of ``source`` (see the module doc)."""
    memory, handover = _memory_of(source)
    for name, (pa, size) in handover.subtrees.items():
        yield Subtree(name, pa, size)
    if abi.LUO_KHO_ENTRY_NAME not in handover.subtrees:
        yield Problem("root", "no LUO subtree: the next kernel boots as a first boot")
        return
    root_pa, root_size = handover.subtrees[abi.LUO_KHO_ENTRY_NAME]
    compatible, num, sessions_pa, flbs_pa = abi.LUO_SER.unpack(memory.read(root_pa, abi.LUO_SER.size))
    yield Root(root_pa, abi.cstr(compatible), num, sessions_pa, flbs_pa)
    if root_size < abi.LUO_SER.size:
        yield Problem("root", f"LUO subtree is {root_size} bytes, smaller than the 32-byte root")
    if not abi.compatible_is(compatible, abi.LUO_ABI_COMPATIBLE):
        yield Problem("root", f"compatible {abi.cstr(compatible)!r} is not 'luo-v5'")
    records: List[Record] = []
    visited: Dict[int, str] = {root_pa >> PAGE_SHIFT: "the LUO root"}
    session_entries = _chain(memory, sessions_pa, abi.SESSION_SER.size, "sessions", records, visited)
    yield from records
    for entry in session_entries:
        name, files_pa, files_count = abi.SESSION_SER.unpack(memory.read(entry, abi.SESSION_SER.size))
        name = abi.cstr(name)
        yield Session(entry, name, files_pa, files_count)
        records = []
        label = f"files of {name.decode('utf-8', 'backslashreplace')!r}"
        file_entries = _chain(memory, files_pa, abi.FILE_SER.size, label, records, visited)
        yield from records
        if len(file_entries) != files_count:
            yield Problem(label, f"{len(file_entries)} files in the blocks, the session says {files_count}")
        for fentry in file_entries:
            fcompat, data, token = abi.FILE_SER.unpack(memory.read(fentry, abi.FILE_SER.size))
            yield File(fentry, name, abi.cstr(fcompat), token, data)
            handler = file_handler.handler_class(fcompat)
            if handler is None:
                yield Problem(label, f"token {token}: no handler for {abi.cstr(fcompat)!r}")
            elif data:
                # What the file's handler says its record holds (memfd: Memfd).
                yield from handler.walk(memory, data, token, visited)
