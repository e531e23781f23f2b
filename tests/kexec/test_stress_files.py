"""Port of the kernel's luo_stress_files: 500 memfds in one session."""
from __future__ import annotations

import os

from .memfds import ensure_nofile, preserve_new_memfd, text_at_start

SESSION = "kx-many-files"
FILES = 500


def data(i: int) -> bytes:
    return b"file-data-%d" % i


def test_stress_files(liveupdate_kexec) -> None:
    lk = liveupdate_kexec
    ensure_nofile(FILES)
    if lk.stage == 1:
        dev = lk.open()
        session = lk.keep(dev.create_session(SESSION))
        for i in range(FILES):
            preserve_new_memfd(session, i, data(i))
        lk.kexec()

    dev = lk.open()
    session = dev.retrieve_session(SESSION)
    for i in range(FILES):
        fd = session.retrieve(i)
        try:
            assert text_at_start(fd) == data(i), i
        finally:
            os.close(fd)
    session.finish()
    session.close()
