"""The preserved memory on disk: written atomically at each kexec, booted from at start."""
from __future__ import annotations

import glob
import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from liveupdate.service import client, image, testing

from .actors import content


def _digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _preserve(svc: testing.ServiceProcess, name: str, count: int) -> object:
    with svc.open() as dev:
        session = dev.create_session(name)
    for token in range(count):
        memfd = os.memfd_create(name)
        os.write(memfd, content(name, token))
        session.preserve(memfd, token)
        os.close(memfd)
    return session


def _retrieve_all(svc: testing.ServiceProcess, name: str, count: int) -> dict:
    with svc.open() as dev:
        session = dev.retrieve_session(name)
    found = {}
    for token in range(count):
        fd = session.retrieve(token)
        found[token] = os.pread(fd, 1 << 16, 0)
        os.close(fd)
    session.finish()
    session.close()
    return found


def _expected(name: str, count: int) -> dict:
    return {token: content(name, token) for token in range(count)}


def test_a_restarted_service_boots_from_its_image(tmp_path):
    with testing.ServiceProcess(tmp_path, image=True) as first:
        session = _preserve(first, "survivor", 4)
        assert first.kexec()["image"] == first.image
        session.close()
        image_path = first.image
    assert image_path and os.path.exists(image_path)
    assert os.stat(image_path).st_size > 0
    with testing.ServiceProcess(tmp_path, image=True) as second:
        assert second.status()["booted_from_image"] is True
        assert _retrieve_all(second, "survivor", 4) == _expected("survivor", 4)


def test_a_service_sigkilled_after_kexec_restarts_from_that_kexec(tmp_path):
    first = testing.ServiceProcess(tmp_path, image=True).start()
    try:
        session = _preserve(first, "crash", 2)  # held open through the kexec
        first.kexec()
    finally:
        first.kill()
    session.close()
    with testing.ServiceProcess(tmp_path, image=True) as second:
        assert _retrieve_all(second, "crash", 2) == _expected("crash", 2)


@pytest.mark.parametrize("fault", ["stop-mid-write", "stop-before-rename"])
def test_a_service_killed_while_writing_its_image_restarts_from_the_previous_one(tmp_path, fault):
    # Generation 1: "old" handed over and written to the image.
    with testing.ServiceProcess(tmp_path, image=True) as first:
        held = _preserve(first, "old", 3)
        first.kexec()
        held.close()
        image_path = first.image
    previous = _digest(image_path)

    # Generation 2 boots from it, preserves "new" and dies in the middle of
    # writing the next image (the fault stops it there; the test kills it).
    dying = testing.ServiceProcess(tmp_path, image=True, env={image.FAULT_ENV: fault}).start()
    try:
        held = _preserve(dying, "new", 3)
        errors = []

        def kexec() -> None:
            try:
                client.kexec(dying.socket, timeout=60)
            except OSError as exc:
                errors.append(exc)

        caller = threading.Thread(target=kexec, daemon=True)
        caller.start()
        dying.wait_stopped()
        leftovers = glob.glob(os.path.join(str(tmp_path), ".emulator.img.tmp.*"))
        assert leftovers, "the fault should stop the writer with its temporary file on disk"
        dying.kill()
        caller.join(60)
        assert not caller.is_alive()
        assert errors  # the kexec never completed
        held.close()
    finally:
        dying.kill()

    assert _digest(image_path) == previous, "the image was modified in place"
    # Generation 3 boots from the previous complete image: "old" is there
    # as after the first kexec, "new" never made it.
    with testing.ServiceProcess(tmp_path, image=True) as third:
        assert third.status()["booted_from_image"] is True
        assert _retrieve_all(third, "old", 3) == _expected("old", 3)
        with third.open() as dev:
            with pytest.raises(FileNotFoundError):
                dev.retrieve_session("new")
    assert not glob.glob(os.path.join(str(tmp_path), ".emulator.img.tmp.*")), "stale temporary file kept"


def test_write_atomically_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "img"
    target.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        image.write_atomically(str(target), b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["img"]

    image.write_atomically(str(target), b"new contents")
    assert target.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["img"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    target = str(tmp_path / "img")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".img.tmp.{dead.pid}"
    stale.write_bytes(b"torn")
    live = tmp_path / f".img.tmp.{os.getppid()}"
    live.write_bytes(b"someone else's, still being written")
    assert image.remove_stale_temporaries(target) == [str(stale)]
    assert live.exists()


def test_a_corrupt_image_is_a_failed_boot_with_a_clear_message(tmp_path):
    bad = tmp_path / "emulator.img"
    bad.write_bytes(b"\0garbage" * 100)
    svc = testing.ServiceProcess(tmp_path, image=True)
    with pytest.raises(RuntimeError) as caught:
        svc.start()
    assert "exited with 1" in str(caught.value)
    assert "cannot boot from image" in str(caught.value)
    assert "Traceback" not in str(caught.value)
    assert bad.read_bytes() == b"\0garbage" * 100  # left for a human to look at


def test_random_kills_during_kexecs_always_leave_a_complete_image(tmp_path):
    """Kill the service at arbitrary moments of a stream of kexecs (each
    one writing an image); every restart must boot and find exactly the
    generation of one complete kexec, with its contents."""
    rng = random.Random(1234)
    for attempt in range(5):
        svc = testing.ServiceProcess(tmp_path, image=True).start()
        stop = threading.Event()
        done = []

        def churn() -> None:
            generation = 0
            try:
                while not stop.is_set():
                    generation += 1
                    name = f"a{attempt}-g{generation}"
                    session = _preserve(svc, name, 2)
                    svc.kexec()
                    done.append(name)
                    session.close()
            except OSError:
                pass  # the service was killed under us

        worker = threading.Thread(target=churn, daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        svc.kill()
        stop.set()
        worker.join(60)
        assert not worker.is_alive()
        assert done, svc.log()

        with testing.ServiceProcess(tmp_path, image=True) as again:
            with again.open() as dev:
                found = []
                for name in done + [f"a{attempt}-g{len(done) + 1}"]:
                    try:
                        session = dev.retrieve_session(name)
                    except FileNotFoundError:
                        continue
                    found.append(name)
                    for token in range(2):
                        fd = session.retrieve(token)
                        assert os.pread(fd, 4096, 0) == content(name, token)
                        os.close(fd)
                    session.close()
            # The image is the last complete kexec's (or the one under way
            # if its rename landed just before the kill): one generation.
            assert len(found) == 1, (found, done)
            assert found[0] in (done[-1], f"a{attempt}-g{len(done) + 1}")
