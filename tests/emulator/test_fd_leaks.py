"""The emulator leaks no fds: long create/close, open/close and
preserve/retrieve cycles leave /proc/self/fd exactly as it was."""
from __future__ import annotations

import gc
import os
from typing import Set

import pytest

liveupdate = pytest.importorskip("liveupdate")
Emulator = pytest.importorskip("liveupdate.emulator").Emulator


def open_fds() -> Set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def settle() -> Set[int]:
    # listdir's own fd is gone once it returns; collect anything cyclic
    # first so a leak is a leak and not garbage waiting for the collector.
    gc.collect()
    return open_fds()


def test_10000_create_close_cycles() -> None:
    emu = Emulator()
    with emu.open() as dev:
        dev.create_session("warm-up").close()
        before = settle()
        for i in range(10_000):
            dev.create_session(f"cycle-{i % 7}").close()
        assert settle() == before


def test_10000_failed_creates_leak_nothing() -> None:
    emu = Emulator()
    with emu.open() as dev:
        keep = dev.create_session("taken")
        before = settle()
        for _ in range(10_000):
            with pytest.raises(FileExistsError):
                dev.create_session("taken")
        assert settle() == before
        keep.close()


def test_device_open_close_cycles() -> None:
    emu = Emulator()
    emu.open().close()
    before = settle()
    for _ in range(2_000):
        emu.open().close()
    assert settle() == before


def test_busy_open_attempts_leak_nothing() -> None:
    emu = Emulator()
    with emu.open():
        before = settle()
        for _ in range(1_000):
            with pytest.raises(OSError):
                emu.open()
        assert settle() == before


def test_preserve_close_cycles() -> None:
    emu = Emulator()
    fd = os.memfd_create("cycled")
    os.write(fd, b"x" * 10_000)
    try:
        with emu.open() as dev:
            with dev.create_session("warm") as s:
                s.preserve(fd, 0)
            before = settle()
            for i in range(1_000):
                with dev.create_session("cycled") as session:
                    session.preserve(fd, i)
                    with pytest.raises(OSError):
                        session.preserve(fd, i + 1)  # EBUSY: same file
            assert settle() == before
    finally:
        os.close(fd)


def test_preserve_kexec_retrieve_finish_cycles() -> None:
    emu = Emulator()
    source = os.memfd_create("source")
    os.write(source, b"payload")
    try:
        before = None
        for round_ in range(60):
            dev = emu.open()
            session = dev.create_session("carried")
            for token in range(5):
                fd = os.memfd_create("f")
                os.write(fd, b"%d" % token)
                session.preserve(fd, token)
                os.close(fd)
            dev.close()
            emu.kexec()
            try:
                session.close()  # a handle of the old kernel
            except OSError:
                pass
            with emu.open() as dev:
                incoming = dev.retrieve_session("carried")
                for token in range(5):
                    for _ in range(3):
                        os.close(incoming.retrieve(token))
                with pytest.raises(FileNotFoundError):
                    incoming.retrieve(99)
                incoming.finish()
                incoming.close()
            if round_ == 2:
                before = settle()
        assert settle() == before
    finally:
        os.close(source)


def test_unretrieved_files_released_by_kexec() -> None:
    # Files nobody retrieves are dropped at the next kexec; the emulator
    # must let go of whatever it held for them.
    emu = Emulator()
    before = None
    for round_ in range(30):
        with emu.open() as dev:
            session = dev.create_session(f"dropped-{round_}")
            for token in range(10):
                fd = os.memfd_create("f")
                session.preserve(fd, token)
                os.close(fd)
        emu.kexec()
        try:
            session.close()
        except OSError:
            pass
        if round_ == 3:
            before = settle()
    assert settle() == before
