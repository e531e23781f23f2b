"""folio_runs: the run structures against a per-page model."""
from __future__ import annotations

import random

from liveupdate.emulator import abi
from liveupdate.emulator.folio_runs import FolioMap, FolioRun, FolioTable, FolioTablePage, run_bytes, table_runs


def test_run_bytes_are_the_kernels_entries():
    expected = b"".join(abi.folio_pack(0x100000 + i, 3, 7 + i) for i in range(300))
    assert run_bytes(0x100000, 3, 7, 300) == expected
    page = FolioTablePage(0x100000, 3, 7, 256)
    assert page.tobytes() == expected[: 256 * 16]
    assert FolioTablePage(0x100000 + 256, 3, 263, 44).tobytes() == expected[256 * 16:].ljust(4096, b"\0")


def test_table_runs_and_folio_table_agree_with_a_per_entry_decode():
    rng = random.Random(7)
    for _ in range(200):
        pages = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.4:
                pages.append(FolioTablePage(rng.randint(1, 1 << 30), rng.choice([0, 3]), rng.randint(0, 9),
                                            rng.randint(0, 256)))
            elif kind < 0.7:
                base = rng.randint(0, 1 << 30)
                pages.append(bytearray(run_bytes(base, 3, rng.randint(0, 5), rng.randint(0, 256))))
            else:
                pages.append(bytearray(rng.randbytes(rng.randrange(0, 4097) // 16 * 16)))
        nr = rng.randint(0, 256 * len(pages))
        raw = b"".join((p.tobytes() if isinstance(p, FolioTablePage) else bytes(p)).ljust(4096, b"\0")
                       for p in pages)
        count = min(nr, len(raw) // 16)
        model = tuple(abi.folio_unpack(raw, i * 16) for i in range(count))
        assert FolioTable(pages, nr) == model
        flat = []
        for pfn, flags, index, n in table_runs(pages, nr):
            assert n == 1 or pfn
            flat += [((pfn + k) if pfn else 0, flags, index + k) for k in range(n)]
        assert tuple(flat) == model


def test_folio_map_finds_live_pages_and_forgets_removed_runs():
    fmap = FolioMap()
    runs = [FolioRun(0x1000 + 10 * i, 5, object()) for i in range(200)]
    for run in runs:
        fmap.add(run)
    assert fmap.live_pages() == 1000
    for run in runs[::2]:
        fmap.discard(run)
    assert fmap.live_pages() == 500 and len(fmap) == 100
    for i, run in enumerate(runs):
        for k in range(10):
            hit = fmap.page(run.pfn + k)
            if i % 2 == 0 or k >= 5:
                assert hit is None
            else:
                assert hit == (run, k)


def test_entries_whose_run_would_overflow_the_index_decode_one_by_one():
    # Found by the long fuzzing profile: a run from index 2**64-1 is no run
    # (it cannot continue), not an OverflowError.
    raw = abi.folio_pack(5, 3, 2**64 - 1) + abi.folio_pack(6, 3, 0) + abi.folio_pack(7, 3, 1)
    page = bytearray(raw)
    expected = ((5, 3, 2**64 - 1), (6, 3, 0), (7, 3, 1))
    assert FolioTable([page], 3) == expected
    assert table_runs([page], 3) == [(5, 3, 2**64 - 1, 1), (6, 3, 0, 2)]
