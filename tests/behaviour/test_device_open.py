"""Exclusive open of the device (luo_open() in kernel/liveupdate/luo_core.c)
and the API's ``timeout`` that waits for the holder to let go.

No assertion here depends on how long anything takes: the waits are
generous upper bounds that only a hang would reach.
"""
from __future__ import annotations

import errno
import threading
from typing import Any

from .helpers import raises_errno


def test_second_open_is_ebusy_until_first_closes(backend: Any) -> None:
    first = backend.open()
    try:
        with raises_errno(errno.EBUSY):
            backend.open().close()
    finally:
        first.close()
    # Released: the next open works, and is itself exclusive.
    with backend.open():
        with raises_errno(errno.EBUSY):
            backend.open().close()


def test_busy_with_timeout_fails_with_ebusy(backend: Any) -> None:
    with backend.open():
        with raises_errno(errno.EBUSY) as info:
            backend.open(timeout=0.2).close()
    assert "0.2" in str(info.value)


def test_timeout_waits_for_the_holder(backend: Any) -> None:
    holder = backend.open()
    opened = threading.Event()
    release = threading.Timer(0.05, holder.close)
    release.start()
    try:
        # Far longer than the holder keeps it: only a broken wait fails.
        with backend.open(timeout=60) as device:
            opened.set()
            assert device.fileno() >= 0
    finally:
        release.cancel()
        release.join()
        holder.close()
    assert opened.is_set()


def test_close_is_idempotent_and_frees_the_device(backend: Any) -> None:
    device = backend.open()
    device.close()
    device.close()
    assert device.closed
    backend.open().close()


def test_context_manager_closes(backend: Any) -> None:
    with backend.open() as device:
        assert not device.closed
    assert device.closed
    backend.open().close()
