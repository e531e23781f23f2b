"""The bytes one emulated kernel hands the next, pinned.

The digests below were computed by tests/emulator/handover_scenario.py on
the tree before memfd pages and folio arrays were kept in runs (commit
4238218, where every page was an object of its own): every page handed
over, kernel pages and memfd pages, its pfn and its bytes. Any change of
representation must leave them as they are; a change of the kernel's
layout must change them here, deliberately.
"""
from __future__ import annotations

import os

from liveupdate.emulator import Emulator, image

from . import handover_scenario

DIGESTS = [
    "d8efd3ac797d9a00a754eac0ee2dafcb3cf6bdf9a7ac94c15b7c52de0e8ba411",
    "fb247b40e4af8c8e572239cd9ffdeaf4c3e35328dbb0839fb00cd39a54f30334",
]
V1_IMAGE = os.path.join(os.path.dirname(__file__), "data", "v1-image.img")


def test_handovers_are_the_bytes_of_before() -> None:
    emu, digests = handover_scenario.run()
    assert digests == DIGESTS
    # And an image of it carries the same pages back.
    memory = image.loads(image.dumps(emu.memory.handover))
    assert handover_scenario.digest(memory.handover, memory) == DIGESTS[1]


def test_a_version_1_image_still_boots() -> None:
    # Written by the version 1 writer (the same script, on that tree).
    with open(V1_IMAGE, "rb") as src:
        assert src.read(12)[8:12] == (1).to_bytes(4, "little")
    emu = Emulator.from_image(V1_IMAGE)
    with emu.open() as dev:
        s = dev.retrieve_session("v1")
        fd = s.retrieve(7)
        assert os.fstat(fd).st_size == 40 * 4096
        assert os.pread(fd, 29 * 200 + 10, 0) == b"written by a version 1 writer" * 200 + bytes(10)
        os.close(fd)
        s.close()
