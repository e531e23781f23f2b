"""Host side of the VM tier: every test here boots a real LUO kernel through
``tools/vmtest`` and checks what comes back.

They skip, with the reason, where QEMU or the kernel image is missing, except
under CI (env ``CI`` set) with the image present: there a missing QEMU fails,
so CI cannot silently lose the tier. Inside a guest (``LIVEUPDATE_STAGE`` is
set) they skip: a guest does not boot guests.

Each test may record one line for the tier's summary (``guest_summary``);
the lines are printed at the end of the run, where CI logs show them.

While a guest runs, :func:`run_vmtest` prints vmtest's progress lines
(booting, stage 1, kexec, stage 2, a heartbeat every 30 s, each with the
seconds elapsed) to the terminal as they come, past pytest's capture: the
tier takes minutes, and a silent terminal looks like a hang.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMTEST = os.path.join(REPO, "tools", "vmtest")
SHARED_VM = os.path.join(os.path.dirname(REPO), "shared", "vm")
# Margin over vmtest's own --timeout: vmtest kills QEMU itself and reports;
# this outer limit only guards against vmtest itself hanging.
OUTER_MARGIN_S = 60

# For pytest runs in the guest: loading the host's pytest plugins from entry
# points (hypothesis, pytest-benchmark) takes about 25 s of TCG time per
# stage, and the suites run there use neither.
GUEST_PYTEST_ENV = ["PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"]

_summary: List[str] = []
_config: Optional[pytest.Config] = None
# vmtest's own progress lines: "vmtest: [  12.3s] stage 1 running".
_PROGRESS = re.compile(r"^vmtest: \[\s*\d+(\.\d+)?s\] ")


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def progress(line: str) -> None:
    """Write ``line`` to the terminal now, even from inside a test."""
    config = _config
    reporter = config.pluginmanager.get_plugin("terminalreporter") if config else None
    if reporter is None:
        print(line, file=sys.stderr, flush=True)
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        writer = config.get_terminal_writer()
        if getattr(writer, "width_of_current_line", 0):  # after -q's progress dots
            writer.line()
        writer.line(line)
        writer.flush()


def run_vmtest(argv: Sequence[str], timeout: float) -> "subprocess.CompletedProcess[bytes]":
    """``subprocess.run(argv, ...)`` for a ``tools/vmtest`` command line:
    stdout and stderr together, killed after ``timeout`` seconds
    (TimeoutExpired), and each progress line echoed as it comes, labelled
    with the test that runs it."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0].rsplit("/", 1)[-1] or "tier"
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: List[bytes] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            chunks.append(raw)
            text = raw.decode("utf-8", "replace").rstrip()
            if _PROGRESS.match(text):
                progress("VM %s: %s" % (test, text[len("vmtest: "):]))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(5)
        raise subprocess.TimeoutExpired(list(argv), timeout, output=b"".join(chunks)) from None
    reader.join()
    return subprocess.CompletedProcess(list(argv), proc.returncode, b"".join(chunks))


def kernel_image() -> Optional[str]:
    path = os.environ.get("LIVEUPDATE_VM_KERNEL") or os.path.join(SHARED_VM, "bzImage")
    return path if os.path.isfile(path) else None


def selftests_dir() -> Optional[str]:
    path = os.environ.get("LIVEUPDATE_VM_SELFTESTS") or os.path.join(SHARED_VM, "selftests")
    return path if os.path.isdir(path) else None


def require_vm() -> str:
    """The kernel image path, or skip (fail under CI) saying what is missing."""
    kernel = kernel_image()
    if kernel is None:
        pytest.skip("no LUO kernel image (set LIVEUPDATE_VM_KERNEL or put one at %s)"
                    % os.path.join(SHARED_VM, "bzImage"))
    if shutil.which("qemu-system-x86_64") is None:
        reason = "qemu-system-x86_64 is missing; run tools/vm/install-deps.sh"
        if os.environ.get("CI"):
            pytest.fail("CI has the kernel image but " + reason)
        pytest.skip(reason)
    return kernel


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    in_guest = os.environ.get("LIVEUPDATE_STAGE")
    for item in items:
        if not str(item.fspath).startswith(here + os.sep):
            continue
        item.add_marker(pytest.mark.vm)
        if in_guest:
            item.add_marker(pytest.mark.skip(reason="already inside a vmtest guest"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _summary:
        terminalreporter.section("VM tier: results from the guest")
        for line in _summary:
            terminalreporter.write_line(line)


@pytest.fixture
def guest_summary() -> Callable[[str], None]:
    """Record one line for the end-of-run summary of the VM tier."""
    return _summary.append


def junit_counts(path: str) -> Dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, "0") or 0)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def counted(counts: Dict[str, int]) -> str:
    """A junit_counts() result as the VM tier's summary lines show it."""
    return "%(passed)d passed, %(failures)d failed, %(errors)d errors, %(skipped)d skipped" % counts


@dataclass
class VmRun:
    """What one ``tools/vmtest`` run brought back."""

    returncode: int
    output: str
    out: str  # the share's contents plus serial.log
    argv: List[str] = field(default_factory=list)

    def file(self, name: str) -> str:
        path = os.path.join(self.out, name)
        if not os.path.exists(path):
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def junit(self, name: str) -> Dict[str, int]:
        path = os.path.join(self.out, name)
        assert os.path.exists(path), "the guest wrote no %s\n%s" % (name, self.explain())
        return junit_counts(path)

    def explain(self) -> str:
        return "$ %s\n(exit %d)\n%s" % (" ".join(self.argv), self.returncode, self.output[-6000:])


def vm_runner(directory: str) -> Callable[..., VmRun]:
    """``run(command, stage2=None, kexec=False, timeout=300, env=()) -> VmRun``,
    keeping each run's results under ``directory``.

    ``command`` is the guest's stage-1 shell command line; ``stage2`` (or
    ``kexec=True`` for the same command) asks for a real kexec round trip.
    ``timeout`` only guards against hangs: it is several times what a run
    takes on an idle 2-core machine, because TCG slows down tenfold when the
    host is busy."""
    kernel = require_vm()
    counter = [0]

    def run(command: str, stage2: Optional[str] = None, kexec: bool = False,
            timeout: int = 300, env: Sequence[str] = ()) -> VmRun:
        counter[0] += 1
        out = os.path.join(directory, "vm%d" % counter[0])
        argv = [sys.executable, VMTEST, "--kernel", kernel, "--timeout", str(timeout),
                "--out", out, "--python", sys.executable, "--tail", "200"]
        if stage2 is not None:
            argv += ["--stage2", stage2]
        if kexec:
            argv.append("--kexec")
        for pair in env:
            argv += ["--env", pair]
        argv += ["--", command]
        proc = run_vmtest(argv, timeout=timeout + OUTER_MARGIN_S)
        return VmRun(proc.returncode, proc.stdout.decode("utf-8", "replace"), out, argv)

    return run


@pytest.fixture
def run_vm(tmp_path) -> Callable[..., VmRun]:
    """A :func:`vm_runner` keeping its results in the test's tmp_path."""
    return vm_runner(str(tmp_path))
