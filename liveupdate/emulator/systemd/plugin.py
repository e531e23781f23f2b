"""The ``liveupdate_systemd`` pytest fixture (see :mod:`.fixture`); the
``liveupdate.testing`` plugin brings it along with ``liveupdate_kexec``."""
from __future__ import annotations

from typing import Iterator

import pytest

from .fixture import SystemdHarness

__all__ = ["liveupdate_systemd"]


@pytest.fixture
def liveupdate_systemd(tmp_path) -> Iterator[SystemdHarness]:
    """An emulated service manager, over a fresh emulated kernel, for one
    test: load units, start them, :meth:`~SystemdHarness.kexec`."""
    harness = SystemdHarness(str(tmp_path / "systemd"))
    try:
        yield harness
    finally:
        harness.close()
