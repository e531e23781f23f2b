"""walk() and ``liveupdate inspect`` do work bounded by the image's size
(issue 12 item 3), on amplifying and on randomly mutated images.

Sessions may point at one shared files block and files at one shared memfd
record: before, a 12 KB image made the walk decode the same folio array
once per (session, file) pair (about 285 s estimated). Now every page is
decoded once; a page reached again is a Problem, as the kernel refuses it
(a page restores only once).

One in ten mutated handovers and byte-flipped images that load is also
booted and every file the walk shows retrieved: only OSError and
KernelPanic (the kernel's outcomes) may come out.

The bound checked, for any image: at most 100 records and 256 folio
entries per page of memory the image holds (a page holds at most 63
files, 51 sessions or 256 folio entries), plus a few. Not timed.

Profiles: CI-sized by default (a few hundred mutated images, seconds);
``LIVEUPDATE_HYPOTHESIS_PROFILE=long`` (the suite's long profile) runs
twenty times as many.
"""
from __future__ import annotations

import errno
import json
import os
import random
import struct
from typing import Any, List, Tuple


from liveupdate import KernelPanic
from liveupdate.cli import inspect as inspect_cli
from liveupdate.emulator import Emulator, image, walk
from liveupdate.emulator.walk import Block, File, Memfd, Problem, Session

PAGE = 4096
U64 = struct.Struct("<Q")
LONG = os.environ.get("LIVEUPDATE_HYPOTHESIS_PROFILE") == "long"
MUTANTS = 6000 if LONG else 300


def _base() -> Tuple[Any, List[int]]:
    """A handover: 2 sessions, one of 63 files (one full block), a memfd of
    600 pages (a 3-page folio array) among them."""
    emu = Emulator()
    dev = emu.open()
    a = dev.create_session("a")
    b = dev.create_session("b")
    for token in range(63):
        fd = os.memfd_create("f")
        os.ftruncate(fd, (600 if token == 0 else 1) * PAGE)
        if token == 0:
            os.pwrite(fd, b"t0", 0)  # the others are holes: ZERO records
        a.preserve(fd, token)
        os.close(fd)
    fd = os.memfd_create("g")
    os.write(fd, b"g")
    b.preserve(fd, 1)
    os.close(fd)
    dev.close()
    emu.kexec()
    a.close()
    b.close()
    return emu, []


def _bound(memory: Any) -> Tuple[int, int]:
    pages = memory.handover.page_count()
    return 100 * pages + 50, 256 * pages + 256


def _walk_within_bounds(memory: Any) -> List[Any]:
    max_records, max_folios = _bound(memory)
    records, folios = [], 0
    for record in walk(memory):
        records.append(record)
        if isinstance(record, Memfd):
            folios += len(record.folios)
        assert len(records) <= max_records and folios <= max_folios, "walk work beyond the image's size"
    return records


def _amplifying() -> Any:
    """51 sessions all naming the files block of "a", whose 63 files all
    name the memfd record of token 0 (600 folios)."""
    emu, _ = _base()
    memory = image.loads(image.dumps(emu.memory.handover))
    records = list(walk(memory))
    sessions_block = next(r for r in records if isinstance(r, Block) and r.chain == "sessions")
    a = next(r for r in records if isinstance(r, Session) and r.name == b"a")
    record0 = next(r for r in records if isinstance(r, File) and r.token == 0).data
    for i in range(51):
        entry = sessions_block.pa + 16 + 80 * i
        memory.write(entry, (b"s%02d" % i).ljust(64, b"\0") + U64.pack(a.files_pa) + U64.pack(63))
    memory.write(sessions_block.pa + 8, U64.pack(51))
    files_block = next(r for r in records if isinstance(r, Block) and r.chain == "files of 'a'")
    for i in range(63):
        memory.write(files_block.pa + 16 + 64 * i + 48, U64.pack(record0))
    return memory


def test_an_amplifying_image_is_decoded_once():
    memory = _amplifying()
    raw = image.dumps(memory.handover)
    assert len(raw) < 32 << 10  # a small image...
    records = _walk_within_bounds(memory)
    # ...whose one memfd record is decoded once, not 51 * 63 times.
    assert sum(isinstance(r, Memfd) for r in records) == 1
    assert sum(len(r.folios) for r in records if isinstance(r, Memfd)) == 600
    assert sum(isinstance(r, Session) for r in records) == 51
    shared = [r for r in records if isinstance(r, Problem) and "not decoded again" in r.message]
    assert len(shared) == 50 + 62  # the other sessions' chain, the other files' record


def test_inspect_of_an_amplifying_image_is_bounded(tmp_path):
    path = tmp_path / "amplifying.img"
    path.write_bytes(image.dumps(_amplifying().handover))
    doc = inspect_cli.decode(str(path))
    assert len(doc["sessions"]) == 51
    assert sum(1 for s in doc["sessions"] for f in s["files"] if f["memfd"]) == 1
    assert any("not decoded again" in p["problem"] for p in doc["problems"])
    json.dumps(doc)


def _mutate(rng: random.Random, memory: Any, pas: List[int]) -> None:
    kernel = sorted(memory.handover.pages)
    for _ in range(rng.randint(1, 4)):
        pfn = rng.choice(kernel)
        offset = rng.randrange(0, PAGE // 8) * 8
        value = rng.choice([0, 1, 51, 63, 64, 255, 256, 2**32 - 1, 2**64 - 1, rng.getrandbits(64),
                            rng.choice(pas), rng.choice(pas) + rng.choice([16, 80, 64, 8]),
                            rng.randrange(1, 1 << 20)])
        memory.write((pfn << 12) + offset, U64.pack(value))
        if pfn not in memory.handover.pages:
            memory.handover.pages[pfn] = memory.pages[pfn]


def test_mutated_images_walk_and_inspect_within_bounds(tmp_path):
    emu, _ = _base()
    raw = image.dumps(emu.memory.handover)
    base = image.loads(raw)
    pas = [pfn << 12 for pfn in base.handover.pages]
    rng = random.Random(0x5CA1E)
    path = tmp_path / "mutant.img"
    for n in range(MUTANTS):
        memory = image.loads(raw)
        _mutate(rng, memory, pas)
        records = _walk_within_bounds(memory)
        if n % 10 == 0:
            _boot_and_retrieve(memory, records)
        if n % 25 == 0:  # through the file and the CLI's decoder too
            path.write_bytes(image.dumps(memory.handover))
            json.dumps(inspect_cli.decode(str(path)))


def test_byte_flipped_images_are_refused_or_walk_within_bounds():
    emu, _ = _amplifying(), None
    raw = image.dumps(emu.handover)
    rng = random.Random(12)
    for _ in range(MUTANTS):
        bad = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(bad))
            bad[i] = rng.randrange(256)
        try:
            memory = image.loads(bytes(bad))
        except OSError as exc:
            assert exc.errno in (errno.ENOEXEC, errno.ENOMEM), exc
            continue
        records = _walk_within_bounds(memory)
        if rng.random() < 0.1:
            _boot_and_retrieve(memory, records)


def _boot_and_retrieve(memory, records):  # type: ignore[no-untyped-def]
    """Boot what loaded and retrieve every file the walk shows: only the
    kernel's outcomes (OSError, KernelPanic) are acceptable."""
    try:
        emu = Emulator.boot(memory)
        with emu.open() as dev:
            for session in [r for r in records if isinstance(r, Session)]:
                try:
                    incoming = dev.retrieve_session(session.name.decode("utf-8", "replace"))
                except (OSError, ValueError):
                    continue
                for f in [r for r in records if isinstance(r, File) and r.session == session.name]:
                    try:
                        os.close(incoming.retrieve(f.token))
                    except OSError:
                        pass
                try:
                    incoming.finish()
                except OSError:
                    pass
                incoming.close()
    except (OSError, KernelPanic):
        pass
