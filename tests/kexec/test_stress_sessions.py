"""Port of the kernel's luo_stress_sessions: 2000 empty sessions."""
from __future__ import annotations

from .memfds import ensure_nofile

SESSIONS = 2000


def name(i: int) -> str:
    return "kx-many-%d" % i


def test_stress_sessions(liveupdate_kexec) -> None:
    lk = liveupdate_kexec
    ensure_nofile(SESSIONS)
    if lk.stage == 1:
        dev = lk.open()
        for i in range(SESSIONS):
            lk.keep(dev.create_session(name(i)))
        lk.kexec()

    dev = lk.open()
    for i in range(SESSIONS):
        session = dev.retrieve_session(name(i))
        assert session.name == name(i)
        session.finish()
        session.close()
