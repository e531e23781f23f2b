"""Port of the kernel's luo_multi_session: empty sessions and sessions with
one and two memfds cross the same kexec, each keeping its own files."""
from __future__ import annotations

import os

from .memfds import preserve_new_memfd, text_at_start

EMPTY = ["kx-multi-empty-1", "kx-multi-empty-2"]
FILES = {
    "kx-multi-files-1": {0x1001: b"Data for session files 1"},
    "kx-multi-files-2": {0x2002: b"First file for session files 2",
                         0x3003: b"Second file for session files 2"},
}


def test_multi_session(liveupdate_kexec) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        dev = lk.open()
        for name in EMPTY:
            lk.keep(dev.create_session(name))
        for name, files in FILES.items():
            session = lk.keep(dev.create_session(name))
            for token, data in files.items():
                preserve_new_memfd(session, token, data)
        lk.kexec()

    dev = lk.open()
    sessions = {name: dev.retrieve_session(name) for name in EMPTY + list(FILES)}
    for name, files in FILES.items():
        for token, data in files.items():
            fd = sessions[name].retrieve(token)
            try:
                assert text_at_start(fd) == data, (name, token)
            finally:
                os.close(fd)
    for session in sessions.values():
        session.finish()
        session.close()
