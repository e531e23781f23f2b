"""`liveupdate inspect` on images the emulator writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import liveupdate
from liveupdate.cli import main


@pytest.fixture
def image(tmp_path):
    emu = liveupdate.Emulator()
    with emu.open() as dev:
        cache = dev.create_session("cache")
        dev.create_session("empty").close()
        for i, size in enumerate((10, 5000, 70000)):
            fd = os.memfd_create(f"m{i}")
            os.write(fd, b"x" * size)
            cache.preserve(fd, 0xC0DE0000 + i)
            os.close(fd)
        keep = dev.create_session("kept")
    path = tmp_path / "handover.img"
    emu.kexec(image=str(path))
    cache.close()
    keep.close()
    return path


def test_text(image, capsys):
    assert main(["inspect", str(image)]) == 0
    out = capsys.readouterr().out
    assert "compatible 'luo-v5', liveupdate number 1" in out
    assert "chain sessions: 1 block(s), 2 entries (51 per block)" in out
    assert "session 'cache': 3 file(s)" in out
    assert "token 3235774465 (0xc0de0001): memfd-v2, memfd of 5000 bytes" in out
    assert "memfd of 70000 bytes" in out
    assert "session 'kept': 0 file(s)" in out
    assert "'empty'" not in out  # closed before the kexec: not handed over
    assert "PROBLEM" not in out


def test_json(image, capsys):
    assert main(["inspect", "--json", str(image)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["root"]["compatible"] == "luo-v5" and doc["root"]["liveupdate_num"] == 1
    sessions = {s["name"]: s for s in doc["sessions"]}
    assert set(sessions) == {"cache", "kept"}
    tokens = [f["token"] for f in sessions["cache"]["files"]]
    assert tokens == [0xC0DE0000, 0xC0DE0001, 0xC0DE0002]
    assert [f["memfd"]["size"] for f in sessions["cache"]["files"]] == [10, 5000, 70000]
    files_chain = [c for c in doc["chains"] if c["chain"] == "files of 'cache'"][0]
    assert files_chain["capacity"] == 63 and files_chain["blocks"][0]["count"] == 3
    assert doc["problems"] == []


def test_corrupted_chain_is_reported_not_hidden(image, capsys):
    from liveupdate.emulator import image as image_module

    memory = image_module.load(str(image))
    root_pa = memory.handover.subtrees["LUO"][0]
    sessions_pa = int.from_bytes(memory.read(root_pa + 16, 8), "little")
    memory.write(sessions_pa + 8, (0).to_bytes(8, "little"))  # block count 0
    image_module.save(str(image), memory.handover)
    assert main(["inspect", str(image)]) == 1
    assert "PROBLEM in sessions" in capsys.readouterr().out


def test_not_an_image_is_one_clear_line(tmp_path):
    path = tmp_path / "not-an-image"
    path.write_bytes(b"hello")
    proc = subprocess.run([sys.executable, "-m", "liveupdate", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "not a usable emulator image" in proc.stderr and "hint:" in proc.stderr
