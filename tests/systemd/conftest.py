"""Host side of the real-systemd tier: one guest run serves every test here.

``tools/vmtest --systemd --boots 3`` builds (or reuses) the Debian sid
image with systemd >= 261, boots it on the LUO kernel, and runs
``guest/stage.py`` in each of three boots with two real ``systemctl kexec``
between them. The services under test (``guest/services``, units in
``guest/units``) use only liveupdate's public API and write what they find
at every start; the tests compare that with what should have survived.

The guest's results stay in ``$TMPDIR/liveupdate-systemd-tier`` (or
``$LIVEUPDATE_SYSTEMD_TIER_OUT``) until the next run: each boot's journal,
the serial log, the services' reports. ``LIVEUPDATE_SYSTEMD_TIER_RESULTS=DIR``
checks the results an earlier run left in DIR instead of booting.

Skips, with the reason, where the tier cannot run (no kernel image, no
QEMU, not root, no mmdebstrap); under CI (``CI`` set) with the kernel image
present each of those is a failure instead, so CI cannot lose the tier.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GUEST = os.path.join(HERE, "guest")
EXAMPLE = os.path.join(REPO, "examples", "cache_daemon")
VMTEST = os.path.join(REPO, "tools", "vmtest")
SHARED_VM = os.path.join(os.path.dirname(REPO), "shared", "vm")
BOOTS = 3
# Several times a run on an idle 2-core machine (about 5 minutes): TCG
# slows down manyfold when the host is busy.
TIMEOUT_S = 1800

sys.path.insert(0, GUEST)
from scenarios import SERVICES  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.systemd)
            if os.environ.get("LIVEUPDATE_STAGE"):
                item.add_marker(pytest.mark.skip(reason="already inside a vmtest guest"))
            callspec = getattr(item, "callspec", None)
            if (callspec is not None and callspec.params.get("tier") == "systemd") or "differential" in item.nodeid:
                item.add_marker(pytest.mark.vm)


def _cannot_run(reason: str) -> None:
    kernel = os.environ.get("LIVEUPDATE_VM_KERNEL") or os.path.join(SHARED_VM, "bzImage")
    if os.environ.get("CI") and os.path.isfile(kernel):
        pytest.fail("CI has the kernel image but the systemd tier cannot run: " + reason)
    pytest.skip(reason)


@dataclass
class Tier:
    """What the guest run brought back."""

    returncode: int
    output: str
    out: str
    stages: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    boots: Dict[str, int] = field(default_factory=dict)  # boot id -> stage

    def explain(self) -> str:
        return "systemd tier: vmtest exit %d, results in %s\n%s" % (self.returncode, self.out, self.output[-8000:])

    def starts(self, unit: str) -> List[Dict[str, Any]]:
        """Every start of ``unit``, in order, each with its ``stage``."""
        path = os.path.join(self.out, "tier", "reports", unit + ".jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        for record in records:
            record["stage"] = self.boots.get(record["boot"])
        return records

    def starts_in(self, unit: str, stage: int) -> List[Dict[str, Any]]:
        return [r for r in self.starts(unit) if r["stage"] == stage]

    def check(self, stage: int, unit: str) -> Dict[str, Any]:
        return self.stages.get(stage, {}).get("check", {}).get("before kexec", {}).get(unit, {})

    def shutdown_warnings(self) -> List[Tuple[str, str]]:
        """(fd store name, error text) of each fd systemd-shutdown said it
        could not preserve (its log goes to the console, not the journal)."""
        return [(m.group(1), m.group(2)) for m in
                re.finditer(r"Failed to preserve LUO fd \d+ \(name '([^']*)'\) with token \d+, "
                            r"will be lost across kexec: ([^\r\n]*)", self.serial())]

    def serial(self) -> str:
        path = os.path.join(self.out, "serial.log")
        if not os.path.exists(path):
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _say(config: pytest.Config, line: str) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def _load(result: Tier) -> Tier:
    for stage in range(1, BOOTS + 1):
        path = os.path.join(result.out, "tier", "stage%d.json" % stage)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                result.stages[stage] = json.load(f)
            result.boots[result.stages[stage]["boot"]] = stage
    return result


@pytest.fixture(scope="session", params=["systemd", "emulated"])
def tier(request: pytest.FixtureRequest) -> Tier:
    """The three boots under real systemd (in the guest) and under the
    emulated manager (on this host): every test here holds for both."""
    return request.getfixturevalue(request.param + "_tier")


@pytest.fixture(scope="session")
def emulated_tier(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tier:
    """The same services, units and flow under liveupdate.emulator.systemd."""
    again = os.environ.get("LIVEUPDATE_EMULATED_TIER_RESULTS")
    if again:
        return _load(Tier(0, "(results of an earlier run: %s)" % again, again))
    from . import emulated

    out = str(tmp_path_factory.mktemp("emulated-tier"))
    start = time.monotonic()
    try:
        emulated.run(out)
        rc, output = 0, ""
    except Exception as exc:  # the tests then fail with what happened
        import traceback

        rc, output = 1, traceback.format_exc()
    _say(request.config, "systemd tier, emulated manager: 3 boots in %.0f s" % (time.monotonic() - start))
    return _load(Tier(rc, output, out))


@pytest.fixture(scope="session")
def systemd_tier(request: pytest.FixtureRequest) -> Iterator[Tier]:
    again = os.environ.get("LIVEUPDATE_SYSTEMD_TIER_RESULTS")
    if again:
        # The --out directory of an earlier guest run: check it again
        # without booting (for work on the assertions).
        yield _load(Tier(0, "(results of an earlier run: %s)" % again, again))
        return
    kernel = os.environ.get("LIVEUPDATE_VM_KERNEL") or os.path.join(SHARED_VM, "bzImage")
    if not os.path.isfile(kernel):
        pytest.skip("no LUO kernel image (set LIVEUPDATE_VM_KERNEL or put one at %s)" % kernel)
    if shutil.which("qemu-system-x86_64") is None:
        _cannot_run("qemu-system-x86_64 is missing; run tools/vm/install-deps.sh")
    if os.geteuid() != 0:
        _cannot_run("building the systemd guest image needs root (mmdebstrap, chroot, mkfs.ext4 -d)")
    if shutil.which("mmdebstrap") is None:
        _cannot_run("mmdebstrap is missing; run tools/vm/install-deps.sh")
    # Kept after the run (pytest prunes its own temporary directories),
    # replaced by the next one: the journals and reports to read on failure.
    out = os.environ.get("LIVEUPDATE_SYSTEMD_TIER_OUT") or os.path.join(tempfile.gettempdir(),
                                                                       "liveupdate-systemd-tier")
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, VMTEST, "--kernel", kernel, "--systemd", "--boots", str(BOOTS),
            "--timeout", str(TIMEOUT_S), "--tail", "150", "--share-in", GUEST, "--share-in", EXAMPLE, "--out", out,
            "--", "python3 /run/out/guest/stage.py"]
    _say(request.config, "systemd tier: %d boots of a systemd %s guest, 2 real kexecs (about 5 minutes)"
         % (BOOTS, "262"))
    start = time.monotonic()
    lines: List[str] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(("vmtest: [", "systemd-image: [")):
            _say(request.config, "systemd tier: " + line.rstrip())
    rc = proc.wait()
    result = _load(Tier(rc, "".join(lines), out))
    _say(request.config, "systemd tier: guest run done in %.0f s (exit %d); results in %s"
         % (time.monotonic() - start, rc, out))
    yield result


@pytest.fixture(scope="session")
def guest_ok(tier: Tier) -> Tier:
    """The tier, asserted to have run every stage."""
    assert tier.returncode == 0 and sorted(tier.stages) == list(range(1, BOOTS + 1)), tier.explain()
    for stage, observed in tier.stages.items():
        assert not observed.get("errors"), "stage %d: %s\n%s" % (stage, observed["errors"], tier.explain())
    return tier


def units() -> List[str]:
    return list(SERVICES)


def found_names(record: Optional[Dict[str, Any]]) -> List[str]:
    return [f["name"] for f in (record or {}).get("found", [])]


def events(record: Dict[str, Any], what: str) -> List[Dict[str, Any]]:
    return [e for e in record.get("events", []) if e["what"] == what]
