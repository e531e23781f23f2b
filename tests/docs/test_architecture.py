"""ARCHITECTURE.md names files and names in them to copy: they must exist."""
from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _text() -> str:
    with open(os.path.join(REPO, "ARCHITECTURE.md"), encoding="utf-8") as f:
        return f.read()


def test_every_file_it_names_exists():
    text = _text()
    named = set(re.findall(r"`((?:liveupdate|cdefs|tests|\.ci)/[\w./]+)`", text))
    assert named, "the walk over ARCHITECTURE.md found no paths"
    # An sdist carries no .ci/ (CI is the checkout's): those paths are checked in a checkout only.
    checkout = os.path.isdir(os.path.join(REPO, ".ci"))
    missing = sorted(p for p in named if "NAME" not in p and (checkout or not p.startswith(".ci/"))
                     and not os.path.exists(os.path.join(REPO, p)))
    assert missing == []


def test_the_names_it_says_to_copy_are_where_it_says():
    pairs = [
        ("liveupdate/_abi.py", "LIVEUPDATE_SESSION_RETRIEVE_FD"), ("liveupdate/_abi.py", "unknown_if_einval"),
        ("liveupdate/emulator/luo_session.py", "def _retrieve_fd"), ("liveupdate/session.py", "def finish"),
        ("liveupdate/_backends.py", "def _choose_backend"), ("liveupdate/_backends.py", "BACKENDS = "),
        ("liveupdate/cli/__init__.py", "SUBCOMMANDS = "), ("liveupdate/cli/status.py", "def add_parser"),
        ("liveupdate/emulator/file_handler.py", "class FileHandler"), ("liveupdate/emulator/file_handler.py", "def register"),
        ("tests/emulator/blob_handler.py", "FileHandler"), ("liveupdate/_port.py", "def register_recognizer"),
    ]
    for path, name in pairs:
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            assert name in f.read(), (path, name)
