"""Two-stage tests on the real kernel: ``tests/kexec`` through the
``liveupdate.testing`` plugin across a real kexec, and the plugin's own
bookkeeping when stages fail.

In stage 1 the guest's pytest keeps the sessions open in its own process
and kexecs from there when the run is over; stage 2 is the same command in
the new kernel (``tools/vmtest --kexec``). One round trip serves both tests
here: the plugin's cases (tests/kexec/plugin_cases.py, some failing on
purpose) run in the same pytest as the suite, so their sessions cross the
same kexec, and each test checks its own per-test outcomes.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict

import pytest

from .conftest import GUEST_PYTEST_ENV, REPO, VmRun, vm_runner

PLUGIN_CASES = os.path.join(REPO, "tests", "kexec", "plugin_cases.py")
# Loaded by path: tests/ is no package, so tests/kexec cannot be imported from here.
_spec = importlib.util.spec_from_file_location("liveupdate_plugin_cases", PLUGIN_CASES)
plugin_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plugin_cases)

# plugin_cases.py does not match test_*.py, but pytest collects a file named
# on its command line whatever its name (not when its directory is named
# too, hence the glob, which the guest's shell expands). The emulator check
# of the plugin (test_plugin.py) is left out: it is for machines without
# the device.
COMMAND = ("python3 -m pytest -p no:cacheprovider -q -rfEs "
           "--junitxml=$LIVEUPDATE_VM_OUT/stage$LIVEUPDATE_STAGE.xml "
           "tests/kexec/test_*.py tests/kexec/plugin_cases.py "
           "--deselect tests/kexec/test_plugin.py::test_plugin_cases_on_the_emulator")

# The ports of luo_kexec_simple, luo_multi_session, luo_stress_files,
# luo_stress_sessions and the three memfd property tests.
KEXEC_PORTS = 7


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory) -> VmRun:
    run = vm_runner(str(tmp_path_factory.mktemp("kexec-round-trip")))
    return run(COMMAND, kexec=True, timeout=600, env=GUEST_PYTEST_ENV)


def outcomes(result: VmRun, stage: int) -> Dict[str, str]:
    path = os.path.join(result.out, "stage%d.xml" % stage)
    assert os.path.exists(path), "stage %d left no junit xml\n%s" % (stage, result.explain())
    return plugin_cases.junit_outcomes(path)


def split(result: VmRun, stage: int):
    """(the suite's outcomes, the plugin cases' outcomes) of one stage."""
    every = outcomes(result, stage)
    cases = {name: kind for name, kind in every.items() if name in plugin_cases.EXPECTED}
    suite = {name: kind for name, kind in every.items() if name not in plugin_cases.EXPECTED}
    return suite, cases


def count(outcome: Dict[str, str]) -> str:
    kinds = list(outcome.values())
    return "%d passed, %d failed, %d skipped" % (
        kinds.count("passed"), kinds.count("failed"), kinds.count("skipped"))


def test_kexec_suite_on_device(round_trip: VmRun, guest_summary) -> None:
    before, _ = split(round_trip, 1)
    after, _ = split(round_trip, 2)
    guest_summary("tests/kexec on the device, stage 1: " + count(before))
    guest_summary("tests/kexec on the device, stage 2: " + count(after))
    assert set(before.values()) == {"passed"}, round_trip.explain()
    assert set(after.values()) == {"passed"} and len(after) >= KEXEC_PORTS, round_trip.explain()
    # Stage 2 ran the second half of exactly the tests whose first half
    # reached kexec().
    pending = json.loads(round_trip.file("liveupdate-kexec.json"))["pending"]
    suite_pending = [name.split("::")[1] for name in pending if "plugin_cases" not in name]
    assert sorted(after) == sorted(suite_pending), round_trip.explain()


def test_plugin_stage_bookkeeping(round_trip: VmRun) -> None:
    for stage in (1, 2):
        _, cases = split(round_trip, stage)
        expected = {name: kinds[stage] for name, kinds in plugin_cases.EXPECTED.items()
                    if kinds[stage] is not None}
        assert cases == expected, "stage %d\n%s" % (stage, round_trip.explain())
    # Both stages had deliberate failures, and the round trip still happened.
    assert round_trip.file("stage1.rc").strip() == "1", round_trip.explain()
    assert round_trip.file("stage2.rc").strip() == "1", round_trip.explain()
    assert round_trip.returncode == 1, round_trip.explain()
