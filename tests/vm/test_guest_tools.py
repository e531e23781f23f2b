"""The operator tools' tests in the guest, on the real device, across a real
kexec: status, kexec and systemd against the real kernel, `liveupdate hold`
keeping a session through the kexec, and the example daemon's round trip."""
from __future__ import annotations

import os

import pytest

from .conftest import GUEST_PYTEST_ENV, REPO, counted


def test_tools_on_the_real_kernel(run_vm, guest_summary) -> None:
    if not os.path.isdir(os.path.join(REPO, "tests", "tools")):
        pytest.skip("no tests/tools in this tree")
    junit = "--junitxml=$LIVEUPDATE_VM_OUT/tools-stage$LIVEUPDATE_STAGE.xml"
    # Stage 2 only needs the halves that run after the kexec. The guest's
    # budget: both stages took 825 s on an idle host (263 tests, most
    # starting a CLI child, ~2-4 s each under TCG) and ran out of 900 s on a
    # loaded one before stage 2; the time is the guest's, not a check.
    result = run_vm(f"python3 -m pytest tests/tools -p no:cacheprovider -q -rfEs {junit}",
                    stage2=f"python3 -m pytest tests/tools -p no:cacheprovider -q -rfEs -k real {junit}",
                    env=GUEST_PYTEST_ENV, timeout=1500)
    first = result.junit("tools-stage1.xml")
    guest_summary("tests/tools on the real kernel, stage 1: " + counted(first))
    assert first["passed"] > 0 and first["failures"] == first["errors"] == 0, result.explain()
    second = result.junit("tools-stage2.xml")
    guest_summary("tests/tools after the kexec (hold, example daemon): " + counted(second))
    assert second["passed"] >= 2 and second["failures"] == second["errors"] == second["skipped"] == 0, \
        result.explain()
    assert result.returncode == 0, result.explain()
