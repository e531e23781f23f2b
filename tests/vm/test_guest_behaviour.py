"""The backend-parametrized behaviour tests, run in the guest on the real
``/dev/liveupdate`` with the same expectations as on the emulator.

Only the device parametrization runs there (``LIVEUPDATE_TEST_BACKENDS``),
and a missing device fails instead of skipping (``LIVEUPDATE_REQUIRE_DEVICE``):
in the guest its absence would mean the kernel is wrong, not the machine.
The run is a kexec round trip, so the two-stage tests among them (those
using ``liveupdate_kexec``) get their second half in the next kernel.
"""
from __future__ import annotations

import os

import pytest

from .conftest import GUEST_PYTEST_ENV, REPO, counted

DEVICE_ONLY = ["LIVEUPDATE_TEST_BACKENDS=device", "LIVEUPDATE_REQUIRE_DEVICE=1"]


def test_behaviour_suite_on_device(run_vm, guest_summary) -> None:
    if not os.path.isdir(os.path.join(REPO, "tests", "behaviour")):
        pytest.skip("no tests/behaviour in this tree")
    result = run_vm("python3 -m pytest tests/behaviour -p no:cacheprovider -q -rfEs "
                    "--junitxml=$LIVEUPDATE_VM_OUT/behaviour-stage$LIVEUPDATE_STAGE.xml",
                    kexec=True, env=DEVICE_ONLY + GUEST_PYTEST_ENV, timeout=600)
    first = result.junit("behaviour-stage1.xml")
    guest_summary("tests/behaviour on the device, stage 1: " + counted(first))
    assert first["passed"] > 0 and first["failures"] == first["errors"] == 0, result.explain()
    second = result.junit("behaviour-stage2.xml")
    guest_summary("tests/behaviour on the device, stage 2 (after the kexec): " + counted(second))
    assert second["failures"] == second["errors"] == 0, result.explain()
    assert result.returncode == 0, result.explain()
