"""``liveupdate inspect`` on images with a ``systemd`` session whose mapping
systemd would skip, or that points at what the image does not hold: a
note and the raw text, never a traceback."""
from __future__ import annotations

import io
import os
from typing import Dict

from liveupdate.cli.inspect import decode, render_text
from liveupdate.emulator import Emulator


def image_with(tmp_path, files: Dict[int, bytes]) -> str:
    emu = Emulator()
    with emu.open() as dev:
        session = dev.create_session("systemd")
        for token, data in files.items():
            fd = os.memfd_create("f")
            os.write(fd, data)
            session.preserve(fd, token)
            os.close(fd)
        path = str(tmp_path / "handover.img")
        emu.kexec(image=path)
        session.close()
    return path


def shown(path: str) -> str:
    out = io.StringIO()
    render_text(decode(path), out)
    return out.getvalue()


def test_a_mapping_of_a_newer_version_is_shown_raw(tmp_path) -> None:
    text = shown(image_with(tmp_path, {0: b'{"version":9,"units":{}}'}))
    assert "systemd's mapping (token 0): systemd would skip it: version 9 is newer than the 1 known here" in text
    assert "raw: '{\"version\":9,\"units\":{}}'" in text


def test_entries_that_name_nothing_in_the_image(tmp_path) -> None:
    mapping = (b'{"version":1,"state":{"KExecCount":4},"units":{"u.service":{"fdstore":['
               b'{"type":"fd","name":"gone","token":7},{"type":"luo_session","name":"s","sessionName":"nope"},'
               b'{"type":"fd","name":"self","token":0}]}}}')
    text = shown(image_with(tmp_path, {0: mapping, 1: b"x"}))
    assert "version 1, KExecCount 4, 1 unit(s)" in text
    assert "'gone': token 7: no file at that token in this image" in text
    assert "'s': session 'nope': no such session in this image: lost" in text
    assert "'self': token 0: an invalid token: systemd skips it" in text


def test_no_mapping_at_token_0(tmp_path) -> None:
    doc = decode(image_with(tmp_path, {1: b"x"}))
    assert "no file at token 0" in doc["systemd"]["note"]


def test_an_image_without_systemd_has_no_mapping(tmp_path) -> None:
    emu = Emulator()
    path = str(tmp_path / "empty.img")
    emu.kexec(image=path)
    assert decode(path)["systemd"] is None
