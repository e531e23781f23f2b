"""Fixtures for the behaviour tests, which run on every backend.

These tests also run against the real kernel, where sessions outlive the
test that made them (they belong to the kernel, not to the device fd). So
every session and fd a test makes is registered with ``cleanup`` and closed
at teardown, whether the test passed or not: a leftover session would make
the next test's ``create_session`` fail with EEXIST.
"""
from __future__ import annotations

import contextlib
import errno
import os
import resource
from typing import Any, Callable, Iterator

import pytest

from . import helpers


def pytest_configure(config: pytest.Config) -> None:
    # test_after_kexec.py is written as two-stage live update tests: the
    # liveupdate.testing plugin runs them on the emulator here and across a
    # real kexec in a VM (tools/vmtest --kexec).
    if not config.pluginmanager.has_plugin("liveupdate.testing"):
        config.pluginmanager.import_plugin("liveupdate.testing")


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    """An ExitStack unwound at teardown: push sessions, devices and fds."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def dev(backend: Any, cleanup: contextlib.ExitStack) -> Any:
    """An open Device of the backend under test, closed at teardown."""
    device = backend.open()
    cleanup.callback(helpers.close_handle, device)
    return device


@pytest.fixture
def memfd(cleanup: contextlib.ExitStack) -> Callable[..., int]:
    """Factory: ``memfd(data=b"", name="t", flags=0) -> fd`` closed at teardown."""

    def make(data: bytes = b"", name: str = "test-memfd", flags: int = 0) -> int:
        fd = os.memfd_create(name, flags)
        cleanup.callback(helpers.close_quietly, fd)
        if data:
            os.write(fd, data)
        return fd

    return make


@pytest.fixture
def track(cleanup: contextlib.ExitStack) -> Callable[[Any], Any]:
    """``track(session)`` closes the session at teardown and returns it."""

    def push(obj: Any) -> Any:
        cleanup.callback(helpers.close_handle, obj)
        return obj

    return push


@pytest.fixture
def kexec(backend: Any) -> Callable[[], None]:
    """Run a kexec of the backend under test, or skip where there is none.

    Only the emulator can reboot in the middle of a test; on the real
    device a kexec ends the process, so the VM tier covers those paths with
    two-stage programs instead."""
    run = getattr(backend, "kexec", None)
    if run is None and backend.kind == "emulator":
        run = backend.emulator.kexec
    if run is None:
        pytest.skip(f"the {backend.kind} backend cannot kexec inside a test (the VM tier covers this)")
    return run


def raise_nofile(needed: int) -> None:
    """Make room for ``needed`` more fds, as the selftests'
    luo_ensure_nofile_limit() does (with the same 32 fds of slack)."""
    want = needed + 32 + len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError) as exc:
        if getattr(exc, "errno", errno.EPERM) == errno.EPERM or isinstance(exc, ValueError):
            pytest.skip(f"cannot raise RLIMIT_NOFILE to {want}: {exc}")
        raise


@pytest.fixture
def nofile() -> Iterator[Callable[[int], None]]:
    """``nofile(n)`` raises RLIMIT_NOFILE for the test; restored afterwards."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield raise_nofile
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    except (ValueError, OSError):
        pass  # more fds open than the old limit: leave the raised one
