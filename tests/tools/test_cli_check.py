"""``liveupdate check``: reading systemd's fd store table, and the command's
errors on a machine without systemd. What it predicts is tested against what
really survived a kexec in the systemd tier (tests/systemd)."""
from __future__ import annotations

import os
import subprocess
import sys

from liveupdate.systemd.check import StoredFd, UnitCheck, parse_fdstore_table
from liveupdate.cli.check import render

HERE = os.path.dirname(os.path.abspath(__file__))


def test_reads_the_table_systemd_analyze_prints() -> None:
    # Printed by systemd-analyze fdstore (systemd 262.1) in the systemd tier.
    with open(os.path.join(HERE, "data", "fdstore-table.txt"), encoding="utf-8") as f:
        rows = parse_fdstore_table(f.read())
    assert [name for name, _, _, _ in rows] == [
        "plain", "sealwrite", "futurewrite", "growshrink", "big", "stored", "own", "twice", "twice"]
    assert rows[0] == ("plain", (0, 1), 10, "/ (deleted)")
    assert rows[6] == ("own", (0, 17), 51, "anon_inode:[luo_session] x-drop-own")


def test_names_and_paths_with_spaces_stay_whole() -> None:
    # Laid out as systemd lays out its tables: left-aligned text columns,
    # right-aligned numbers, one space between columns.
    header = "FDNAME      TYPE DEVNO   INODE RDEVNO PATH                        FLAGS"
    row = "a name here reg  0:1   1234567 -      /memfd:with space (deleted) rw"
    assert parse_fdstore_table(header + "\n" + row + "\n") == [
        ("a name here", (0, 1), 1234567, "/memfd:with space (deleted)")]


def test_an_empty_store_and_text_that_is_no_table() -> None:
    assert parse_fdstore_table("No file descriptors in fdstore of 'x.service'.\n") == []
    assert parse_fdstore_table("") == []


def test_render_says_what_is_lost_and_why() -> None:
    check = UnitCheck("x.service", "yes", [
        StoredFd("cache", "memfd", "/memfd:c (deleted)", True, "systemd preserves it"),
        StoredFd("sock", "socket", "socket:[1]", False, "no handler", errno="ENOENT", probed=True),
    ])
    import io

    out = io.StringIO()
    render(check, out)
    text = out.getvalue()
    assert "x.service: 2 fd store entries, FileDescriptorStorePreserve=yes; 1 will be lost" in text
    assert "survives  cache  memfd: systemd preserves it" in text
    assert "lost      sock   socket: no handler" in text


def test_without_systemd_one_line_with_a_hint() -> None:
    proc = subprocess.run([sys.executable, "-m", "liveupdate", "check", "x.service"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:  # pragma: no cover - a machine that systemd runs
        return
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("liveupdate check: ") and "(hint: " in lines[0]
