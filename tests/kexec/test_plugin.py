"""The ``liveupdate.testing`` plugin on the emulator: each case of
plugin_cases.py runs in a separate pytest and ends as expected, deliberate
failures included (the VM tier checks the same cases across a real kexec)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


from . import plugin_cases

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def test_plugin_cases_on_the_emulator(tmp_path) -> None:
    shutil.copy(os.path.join(HERE, "plugin_cases.py"), str(tmp_path / "test_cases.py"))
    env = dict(os.environ)
    for name in ("LIVEUPDATE_STAGE", "LIVEUPDATE_KEXEC_BACKEND", "LIVEUPDATE_VM_KEXEC"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [REPO, env.get("PYTHONPATH", "")] if p)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the cases need only ours
    junit = str(tmp_path / "cases.xml")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "liveupdate.testing", "-p", "no:cacheprovider",
         "-q", "--junitxml", junit, "test_cases.py"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 1, output  # the deliberate failures
    expected = {name: kinds[0] for name, kinds in plugin_cases.EXPECTED.items()}
    assert plugin_cases.junit_outcomes(junit) == expected, output
    # The deliberate failures fail for the right reason, each reported once.
    assert ("lk.state crosses the kexec as JSON, as it must on a real kernel, and cannot here: "
            "lk.state['handle'] = <object object at ") in output, output
    reports = [line for line in output.splitlines() if "test_cleanup_goes_past_a_failing_close" in line
               and line.startswith(("FAILED", "ERROR"))]
    assert len(reports) == 1, output
    assert reports[0].startswith("ERROR test_cases.py::test_cleanup_goes_past_a_failing_close - RuntimeError"), output
