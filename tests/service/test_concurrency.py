"""Many client processes at once: nothing lost, nothing stuck."""
from __future__ import annotations

import os

from .actors import content

CLIENTS = 32
OPERATIONS = 1000


def test_32_clients_of_1000_operations_lose_no_session(service, actors):
    workers = [actors(service.socket, "worker", i, OPERATIONS) for i in range(CLIENTS)]
    # Every wait is bounded: read() fails the test after its timeout.
    reports = [w.read(timeout=300) for w in workers]
    for report in reports:
        assert report["unexpected"] == []
        assert report["ops"] >= OPERATIONS
    kept = sorted(name for report in reports for name in report["kept"])
    assert len(kept) == len(set(kept))

    status = service.status()
    # Exactly the sessions the workers still hold, no device left open, and
    # nothing of the closed ones lingering.
    assert status["connections"]["session"] == len(kept)
    assert status["connections"]["device"] == 0
    assert status["connections"]["stale"] == 0
    assert status["outgoing_sessions"] == len(kept)  # the emulated kernel agrees

    service.kexec()
    for w in workers:
        assert w.finish() == 0

    with service.open() as dev:
        # Opening the device restores what was handed over: all of it.
        assert service.status()["incoming_sessions"] == len(kept)
        for name in kept:
            incoming = dev.retrieve_session(name)
            for token in (0, 7):
                fd = incoming.retrieve(token)
                assert os.pread(fd, 4096, 0) == content(name, token), name
                os.close(fd)
            incoming.finish()
            incoming.close()
        # Sessions the workers closed were released, not handed over.
        for i in range(0, CLIENTS, 7):
            try:
                dev.retrieve_session(f"w{i}-r0-s1")
            except FileNotFoundError:
                pass
            else:
                raise AssertionError(f"w{i}-r0-s1 was closed before the kexec, yet it came through")
    status = service.status()
    assert status["connections"]["session"] == 0
    assert status["incoming_sessions"] == status["outgoing_sessions"] == 0
