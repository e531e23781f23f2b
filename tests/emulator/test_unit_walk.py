"""Unit tests of walk(): decoding preserved memory, corrupted or not."""
from __future__ import annotations

import os

from liveupdate.emulator import Emulator, image, walk
from liveupdate.emulator.walk import Block, File, Memfd, Problem, Root, Session, Subtree


def handed_over() -> Emulator:
    emu = Emulator()
    with emu.open() as dev:
        sessions = []
        for name in ("alpha", "beta"):
            s = dev.create_session(name)
            for token in range(70):  # two file blocks: 63 + 7
                fd = os.memfd_create("w")
                os.write(fd, b"%d" % token)
                s.preserve(fd, token)
                os.close(fd)
            sessions.append(s)
        emu.kexec()
        for s in sessions:
            s.close()
    return emu


def test_walk_shows_every_structure_byte_for_byte() -> None:
    emu = handed_over()
    records = list(walk(emu))
    assert not [r for r in records if isinstance(r, Problem)]
    (root,) = [r for r in records if isinstance(r, Root)]
    assert records[0] == Subtree("LUO", root.pa, 32)
    assert root.compatible == b"luo-v5" and root.liveupdate_num == 1
    assert [s.name for s in records if isinstance(s, Session)] == [b"alpha", b"beta"]
    file_blocks = [b for b in records if isinstance(b, Block) and b.chain.startswith("files")]
    assert [(b.count, b.capacity) for b in file_blocks] == [(63, 63), (7, 63)] * 2
    memfds = [m for m in records if isinstance(m, Memfd)]
    assert len(memfds) == 140 and all(m.size == len(b"%d" % m.token) == m.pos for m in memfds)
    assert all(len(m.folios) == m.nr_folios == 1 and m.folios[0][1] == 3 for m in memfds)
    files = [f for f in records if isinstance(f, File)]
    assert [f.token for f in files[:70]] == list(range(70))


def test_walk_of_an_image_without_booting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    emu = handed_over()
    emu.save_image(tmp_path / "x.img")
    assert list(walk(image.load(tmp_path / "x.img"))) == list(walk(emu))


def test_walk_reports_corruption_instead_of_looping() -> None:
    emu = handed_over()
    records = list(walk(emu))
    blocks = [b for b in records if isinstance(b, Block) and b.chain.startswith("files of 'alpha'")]
    emu.memory.write_u64(blocks[1].pa, blocks[0].pa)  # second block links back to the first
    problems = [r for r in walk(emu) if isinstance(r, Problem)]
    assert any("cycle" in p.message for p in problems)


def test_walk_of_a_first_boot() -> None:
    records = list(walk(Emulator()))
    assert len(records) == 1 and isinstance(records[0], Problem)
