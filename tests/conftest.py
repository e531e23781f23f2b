"""Shared fixtures: the same behaviour tests run on every backend.

``backend`` is parametrized over the in-process emulator (a fresh emulated
kernel per test), the emulator service and the real device. Set
``LIVEUPDATE_TEST_BACKENDS=device`` (comma-separated list) to run only some,
as the VM tier does inside its guest.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import pytest

import liveupdate

ALL_BACKENDS = ("emulator", "service", "device")


def _selected() -> tuple:
    wanted = os.environ.get("LIVEUPDATE_TEST_BACKENDS")
    if not wanted:
        return ALL_BACKENDS
    chosen = tuple(b.strip() for b in wanted.split(",") if b.strip())
    unknown = set(chosen) - set(ALL_BACKENDS)
    if unknown:
        raise pytest.UsageError(f"LIVEUPDATE_TEST_BACKENDS: unknown backend(s) {sorted(unknown)}")
    return chosen


class BackendUnderTest:
    """What a behaviour test needs of a backend: its kind and a way to open
    its device. ``emulator`` is the Emulator for kind "emulator" (None otherwise)."""

    def __init__(self, kind: str, emulator: Any = None, socket: Optional[str] = None) -> None:
        self.kind = kind
        self.emulator = emulator
        self.socket = socket

    def open(self, **kwargs: Any) -> liveupdate.Device:
        if self.kind == "emulator":
            return self.emulator.open(**kwargs)
        if self.kind == "service":
            return liveupdate.open(backend="service", emulator=self.socket, **kwargs)
        return liveupdate.open(backend="device", **kwargs)

    def __repr__(self) -> str:
        return f"<backend {self.kind}>"


@pytest.fixture(scope="session")
def _service_socket(tmp_path_factory):
    from liveupdate.service import testing as service_testing

    with service_testing.running_service(tmp_path_factory.mktemp("luo-service")) as socket:
        yield socket


@pytest.fixture(params=_selected())
def backend(request) -> BackendUnderTest:
    kind = request.param
    if kind == "emulator":
        from liveupdate.emulator import Emulator

        return BackendUnderTest("emulator", emulator=Emulator())
    if kind == "service":
        service = BackendUnderTest("service", socket=request.getfixturevalue("_service_socket"))
        from liveupdate.service import client as service_client

        service.kexec = lambda: service_client.kexec(service.socket)  # type: ignore[attr-defined]
        return service
    if not os.path.exists(liveupdate.DEFAULT_PATH):
        if os.environ.get("LIVEUPDATE_REQUIRE_DEVICE"):
            pytest.fail(f"{liveupdate.DEFAULT_PATH} is required here (LIVEUPDATE_REQUIRE_DEVICE) but missing")
        pytest.skip(f"no {liveupdate.DEFAULT_PATH} on this kernel; the VM tier (tools/vmtest) runs these on a real one")
    return BackendUnderTest("device")
