"""The kernel's own LUO selftests, run in the guest: a sanity check of the
kernel (and of tools/vmtest) before our suites are trusted on it.

``liveupdate`` is the 15-case kselftest harness; the ``luo_*`` programs are
two-stage: ``-s 1`` preserves and leaves a daemon holding the session fds,
the guest kexecs, ``-s 2`` retrieves and verifies in the new kernel.
"""
from __future__ import annotations

import os
import re

import pytest

from .conftest import selftests_dir

HARNESS_CASES = 15
KEXEC_SCENARIOS = ["luo_kexec_simple", "luo_multi_session", "luo_stress_files",
                   "luo_stress_sessions"]


def selftest(name: str) -> str:
    directory = selftests_dir()
    if directory is None or not os.access(os.path.join(directory, name), os.X_OK):
        reason = "kernel selftest %s not found (set LIVEUPDATE_VM_SELFTESTS)" % name
        if os.environ.get("CI"):
            pytest.fail("CI has the kernel image but " + reason)
        pytest.skip(reason)
    return os.path.join(directory, name)


def test_liveupdate_harness(run_vm, guest_summary) -> None:
    program = selftest("liveupdate")
    result = run_vm("%s > $LIVEUPDATE_VM_OUT/harness.tap 2>&1" % program, timeout=300)
    tap = result.file("harness.tap")
    assert result.returncode == 0, result.explain() + "\n" + tap
    totals = re.search(r"# Totals: pass:(\d+) fail:(\d+) xfail:\d+ xpass:\d+ skip:(\d+) error:(\d+)", tap)
    assert totals, "no kselftest totals line in the harness output:\n" + tap
    passed, failed, skipped, errors = (int(x) for x in totals.groups())
    guest_summary("kernel selftest liveupdate: %d passed, %d failed, %d skipped, %d errors"
                  % (passed, failed, skipped, errors))
    assert (passed, failed, skipped, errors) == (HARNESS_CASES, 0, 0, 0), tap


@pytest.mark.parametrize("name", KEXEC_SCENARIOS)
def test_kexec_scenario(run_vm, guest_summary, name: str) -> None:
    program = selftest(name)
    result = run_vm("%s -s 1 > $LIVEUPDATE_VM_OUT/stage1.log 2>&1" % program,
                    stage2="%s -s 2 > $LIVEUPDATE_VM_OUT/stage2.log 2>&1" % program,
                    timeout=300)
    logs = "--- stage 1:\n%s\n--- stage 2:\n%s" % (result.file("stage1.log"), result.file("stage2.log"))
    assert result.returncode == 0, result.explain() + "\n" + logs
    # The guest init only kexecs after stage 1 exits 0, and stage 2 only runs
    # in a kernel started by a KHO kexec: both rc files prove the round trip.
    assert result.file("stage1.rc").strip() == "0" and result.file("stage2.rc").strip() == "0", logs
    assert "TEST PASSED" in result.file("stage2.log"), logs
    guest_summary("kernel selftest %s: passed across a real kexec" % name)
