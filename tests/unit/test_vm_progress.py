"""The VM tier says what it is doing while a guest runs: vmtest's progress
lines reach the terminal as they come, past pytest's capture (checked with
a stand-in for vmtest, so no VM is booted)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAKE_VMTEST = textwrap.dedent("""
    import sys, time
    for line in ["vmtest: [   0.0s] booting bzImage (tcg, 1 cpu, 2G)", "guest console noise",
                 "vmtest: [  18.2s] stage 1 running", "vmtest: [  18.4s] kexec into stage 2",
                 "vmtest: [  38.5s] stage 2 running"]:
        print(line, flush=True)
        time.sleep(0.05)
    sys.exit(3)
""")

TEST = textwrap.dedent("""
    import sys, time
    import vm.conftest

    def test_a_guest():
        started = time.monotonic()
        done = vm.conftest.run_vmtest([sys.executable, "-c", FAKE], timeout=60)
        assert done.returncode == 3
        assert b"guest console noise" in done.stdout      # all of it still comes back

    def test_a_hang_is_killed():
        import subprocess, pytest
        with pytest.raises(subprocess.TimeoutExpired) as info:
            vm.conftest.run_vmtest([sys.executable, "-c", "print('vmtest: [   0.0s] booting', flush=True); "
                                    "import time; time.sleep(60)"], timeout=2)
        assert b"booting" in info.value.output
""")


def test_progress_lines_are_shown_while_the_guest_runs(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["vm.conftest"]\n')
    (tmp_path / "test_fake_guest.py").write_text(TEST.replace("FAKE", repr(FAKE_VMTEST)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fake_guest.py"],
                          cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stdout
    shown = [line for line in done.stdout.splitlines() if line.startswith("VM ")]
    assert shown[:4] == [
        "VM test_fake_guest.py::test_a_guest: [   0.0s] booting bzImage (tcg, 1 cpu, 2G)",
        "VM test_fake_guest.py::test_a_guest: [  18.2s] stage 1 running",
        "VM test_fake_guest.py::test_a_guest: [  18.4s] kexec into stage 2",
        "VM test_fake_guest.py::test_a_guest: [  38.5s] stage 2 running",
    ], done.stdout
    assert "guest console noise" not in done.stdout
    assert "VM test_fake_guest.py::test_a_hang_is_killed: [   0.0s] booting" in shown
