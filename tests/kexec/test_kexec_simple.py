"""Port of the kernel's luo_kexec_simple: one session, one memfd, one kexec."""
from __future__ import annotations

import os

from .memfds import preserve_new_memfd, text_at_start

SESSION = "kx-simple"
TOKEN = 0x1A
DATA = b"hello kexec world"


def test_kexec_simple(liveupdate_kexec) -> None:
    lk = liveupdate_kexec
    if lk.stage == 1:
        dev = lk.open()
        session = lk.keep(dev.create_session(SESSION))
        preserve_new_memfd(session, TOKEN, DATA)
        lk.kexec()

    dev = lk.open()
    session = dev.retrieve_session(SESSION)
    fd = session.retrieve(TOKEN)
    try:
        assert text_at_start(fd) == DATA
    finally:
        os.close(fd)
    session.finish()
    session.close()
