"""A deterministic emulator workload whose handovers the golden tests pin.

Run on a given tree, it produces the same physical addresses and the same
bytes every time: sessions, memfds of data, holes, a sparse 512 MiB memfd
whose folio array needs two vmalloc chunks, seals, positions, and two
kexecs (the second hands over a session the first kernel handed over and
nobody retrieved). :func:`flat_pages` lists every page handed over as the
version 1 image did, so that its digest is comparable across
representations of memory (tests/emulator/test_handover_golden.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from typing import Any, Iterator, List, Tuple

PAGE = 4096


def flat_pages(handover: Any, memory: Any) -> Iterator[Tuple[int, bytes]]:
    """(pfn, bytes without trailing zeros) of every page handed over, in pfn order."""
    pfns = set(handover.pages)
    folios = getattr(handover, "folios", None)
    if folios is not None:
        for run in folios:
            for first, count in run.segments():
                pfns.update(range(first, first + count))
    view = type(memory)()
    view.pages = handover.pages
    if folios is not None:
        view.folios = folios
    for pfn in sorted(pfns):
        yield pfn, view.page_bytes(pfn).rstrip(b"\0")


def digest(handover: Any, memory: Any) -> str:
    h = hashlib.sha256()
    for name, (pa, size) in sorted(handover.subtrees.items()):
        h.update(f"{name}:{pa}:{size};".encode())
    for pfn, data in flat_pages(handover, memory):
        h.update(pfn.to_bytes(8, "little") + len(data).to_bytes(4, "little") + data)
    return h.hexdigest()


def run() -> Tuple[Any, List[str]]:
    """The workload; returns the emulator and the digest after each kexec."""
    from liveupdate.emulator import Emulator

    emu = Emulator()
    digests = []
    dev = emu.open()
    a = dev.create_session("alpha")
    b = dev.create_session("beta")
    fds = []

    def memfd(name: str, size: int, writes: List[Tuple[int, bytes]], pos: int = 0, seals: int = 0) -> int:
        fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.lseek(fd, pos, os.SEEK_SET)
        if seals:
            fcntl.fcntl(fd, 1033, seals)
        fds.append(fd)
        return fd

    a.preserve(memfd("small", 10, [(0, b"0123456789")], pos=3), 1)
    a.preserve(memfd("pages", 300 * PAGE + 17, [(i * PAGE, bytes([i % 251 + 1]) * 100) for i in range(0, 300, 7)]), 2)
    a.preserve(memfd("empty", 0, []), 3)
    b.preserve(memfd("sealed", 5 * PAGE, [(PAGE, b"sealed")], seals=0x2 | 0x4), 10)
    b.preserve(memfd("sparse", 512 << 20, [(0, b"head"), ((512 << 20) - 3, b"end"), (200 << 20, b"mid" * 2000)]), 11)
    dev.close()
    emu.kexec()
    digests.append(digest(emu.memory.handover, emu.memory))
    a.close()
    b.close()
    dev = emu.open()
    s = dev.retrieve_session("alpha")
    got = s.retrieve(2)
    os.close(got)
    s.finish()
    s.close()
    c = dev.create_session("gamma")
    c.preserve(memfd("later", 3 * PAGE, [(PAGE + 5, b"later")], pos=7), 20)
    dev.close()
    emu.kexec()
    digests.append(digest(emu.memory.handover, emu.memory))
    c.close()
    for fd in fds:
        os.close(fd)
    return emu, digests


if __name__ == "__main__":
    import sys

    sys.path.insert(0, sys.argv[1])
    emu, digests = run()
    print("\n".join(digests))
    if len(sys.argv) > 2:
        from liveupdate.emulator import Emulator, image

        # A small image of the tree given (version 1 on 4238218), for the
        # reader's test: tests/emulator/data/v1-image.img.
        e = Emulator()
        d = e.open()
        s = d.create_session("v1")
        fd = os.memfd_create("v1")
        os.write(fd, b"written by a version 1 writer" * 200)
        os.ftruncate(fd, 40 * PAGE)
        s.preserve(fd, 7)
        d.close()
        e.kexec()
        with open(sys.argv[2], "wb") as out:
            out.write(image.dumps(e.memory.handover))
