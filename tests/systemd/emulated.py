"""The systemd tier's three boots under the emulated manager, on this host.

The same services, the same unit files and the same flow (guest/flow.py)
as under real systemd in the guest, with liveupdate.emulator.systemd
playing systemd and an in-process emulator playing the kernel. The results
land in the same layout as the guest's (``tier/stageN.json``,
``tier/reports/UNIT.jsonl``), so that one set of tests reads both and the
differential compares them record by record.

The unit files are the guest's, with their paths moved to this run's
directory (``/usr/local/lib/luo-tier``, the example daemon's ``/opt`` and
``/run`` paths) and ``/usr/bin/python3`` to this interpreter; nothing else
in them changes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "guest")
REPO = os.path.dirname(os.path.dirname(HERE))
EXAMPLE = os.path.join(REPO, "examples", "cache_daemon")
sys.path.insert(0, GUEST)
from flow import DAEMON_UNIT, LAST_STAGE, UNITS, System, run_stage  # noqa: E402
from scenarios import SERVICES  # noqa: E402

from liveupdate.cli.check import render  # noqa: E402
from liveupdate.emulator.systemd.manager import EmulatedSystemd  # noqa: E402


class Emulated(System):
    def __init__(self, manager: EmulatedSystemd, root: str, stage: int) -> None:
        self.manager = manager
        self.root = root
        self.stage = stage
        self.errors: List[str] = []

    def moved(self, text: str) -> str:
        for old, new in (("/usr/local/lib/luo-tier", os.path.join(self.root, "lib")),
                         ("/opt/liveupdate/examples/cache_daemon", os.path.join(self.root, "daemon")),
                         ("/run/cache-daemon.sock", os.path.join(self.root, "cache-daemon.sock")),
                         ("/usr/bin/python3", sys.executable)):
            text = text.replace(old, new)
        return text

    def say(self, text: str) -> None:
        pass

    def install(self) -> Dict[str, Any]:
        lib = os.path.join(self.root, "lib")
        shutil.copytree(os.path.join(GUEST, "services"), os.path.join(lib, "services"), dirs_exist_ok=True)
        for name in ("tierlib.py", "scenarios.py"):
            shutil.copy2(os.path.join(GUEST, name), lib)
        os.makedirs(os.path.join(self.root, "daemon"), exist_ok=True)
        shutil.copy2(os.path.join(EXAMPLE, "cache_daemon.py"), os.path.join(self.root, "daemon"))
        paths = {unit: os.path.join(GUEST, "units", unit) for unit in SERVICES}
        paths[DAEMON_UNIT] = os.path.join(EXAMPLE, DAEMON_UNIT)
        for unit in UNITS:
            with open(paths[unit], encoding="utf-8") as f:
                self.manager.load(self.moved(f.read()), name=unit)
        return {"rc": 0, "output": ""}

    def _try(self, what: str, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except OSError as exc:
            self.errors.append("%s %s: %s" % (what, args, exc))

    def start(self, unit: str) -> None:
        self._try("start", self.manager.start, unit)

    def restart(self, unit: str) -> None:
        self._try("restart", self.manager.restart, unit)

    def wait_active(self) -> Dict[str, str]:
        return {u: self.manager.services[u].state for u in UNITS}

    def facts(self, unit: str) -> Dict[str, Any]:
        store = self.manager.fd_store(unit)
        return {"ActiveState": self.manager.services[unit].state, "NFileDescriptorStore": str(len(store)),
                "fdstore": store}

    def check(self, unit: str) -> Dict[str, Any]:
        return self.manager.check(unit).to_dict()

    def check_text(self, units: List[str]) -> str:
        import io

        out = io.StringIO()
        for unit in units:
            render(self.manager.check(unit), out)
        return out.getvalue()

    def daemon(self, *words: str) -> Dict[str, Any]:
        proc = subprocess.run([sys.executable, os.path.join(self.root, "daemon", "cache_daemon.py"), *words,
                               "--socket", os.path.join(self.root, "cache-daemon.sock")],
                              capture_output=True, text=True, timeout=120, env=self.manager.env)
        return {"rc": proc.returncode, "out": proc.stdout.strip(), "err": proc.stderr.strip()[-300:]}


def run(out: str) -> Dict[str, Any]:
    """The three boots; results under ``out`` as the guest leaves them.
    Returns what each emulated kexec reported."""
    root = tempfile.mkdtemp(prefix="luo-tier-emulated-")
    tmpfs = tempfile.mkdtemp(prefix="luo-tier-", dir="/dev/shm")
    reports = os.path.join(root, "data", "reports")
    os.makedirs(reports)
    os.makedirs(os.path.join(out, "tier", "reports"), exist_ok=True)
    env = dict(os.environ, LUO_TIER_REPORTS=reports, LUO_TIER_TMPFS=tmpfs,
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    kexecs: Dict[str, Any] = {}
    try:
        with EmulatedSystemd(env=env, directory=os.path.join(root, "manager")) as manager:
            for stage in range(1, LAST_STAGE + 1):
                boot = "emulated-boot-%d" % stage
                manager.env["LUO_TIER_BOOT"] = boot
                if stage > 1:
                    kexecs[str(stage - 1)] = manager.kexec()
                observed = run_stage(Emulated(manager, root, stage), stage)
                observed["boot"] = boot
                observed["manager"] = "KExecCount=%d" % manager.kexecs
                with open(os.path.join(out, "tier", "stage%d.json" % stage), "w") as f:
                    json.dump(observed, f, indent=1, sort_keys=True)
            logs = {unit: manager.log(unit) for unit in UNITS if os.path.exists(manager.services[unit].log_path)}
        with open(os.path.join(out, "tier", "logs.json"), "w") as f:
            json.dump(logs, f, indent=1)
        # What the emulated systemd-shutdown logged: the serial log's part.
        with open(os.path.join(out, "serial.log"), "w") as f:
            for stage in sorted(kexecs):
                for lost in kexecs[stage]["lost"]:
                    f.write("emulated systemd-shutdown: %s\n" % lost["message"])
        for name in os.listdir(reports):
            shutil.copy2(os.path.join(reports, name), os.path.join(out, "tier", "reports", name))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmpfs, ignore_errors=True)
    return kexecs
