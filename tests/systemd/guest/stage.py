"""The guest driver of the systemd tier, run once per boot by
``tools/vmtest --systemd --boots 3`` (``LIVEUPDATE_STAGE`` is 1, 2, 3):
flow.run_stage with the real systemd, through systemctl.

The services, units and the example daemon are installed on the disk in
boot 1 (the disk survives the kexecs) where their unit files expect them.
Every boot copies the services' reports and its own observations to the
share for the host."""
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from flow import DAEMON_UNIT, UNITS, System, run_stage  # noqa: E402
from scenarios import SERVICES  # noqa: E402
from tierlib import REPORTS  # noqa: E402

LIB = "/usr/local/lib/luo-tier"
# The example daemon, where its shipped unit file expects it.
DAEMON_DIR = "/opt/liveupdate/examples/cache_daemon"
DAEMON_SOCKET = "/run/cache-daemon.sock"


class Systemctl(System):
    def __init__(self, stage: int) -> None:
        self.stage = stage
        self.errors = []

    def run(self, *argv, check=False, timeout=300):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.errors.append("timeout: %s" % " ".join(argv))
            return None
        if check and proc.returncode != 0:
            self.errors.append("%s: exit %d: %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()[-500:]))
        return proc

    def say(self, text):
        print("tier stage %d: %s" % (self.stage, text), flush=True)

    def install(self):
        shutil.copytree(os.path.join(HERE, "services"), os.path.join(LIB, "services"), dirs_exist_ok=True)
        for name in ("tierlib.py", "scenarios.py"):
            shutil.copy2(os.path.join(HERE, name), LIB)
        os.makedirs(REPORTS, exist_ok=True)
        for unit in SERVICES:
            shutil.copy2(os.path.join(HERE, "units", unit), "/etc/systemd/system/")
        shipped = os.path.join(os.path.dirname(HERE), "cache_daemon")
        os.makedirs(DAEMON_DIR, exist_ok=True)
        shutil.copy2(os.path.join(shipped, "cache_daemon.py"), DAEMON_DIR)
        shutil.copy2(os.path.join(shipped, DAEMON_UNIT), "/etc/systemd/system/")
        verify = self.run("systemd-analyze", "verify", *["/etc/systemd/system/" + u for u in UNITS])
        self.run("systemctl", "daemon-reload", check=True)
        self.run("systemctl", "enable", *UNITS, check=True)
        return {"rc": verify.returncode, "output": (verify.stdout + verify.stderr)[-2000:]}

    def start(self, unit):
        self.run("systemctl", "start", unit, check=True)

    def restart(self, unit):
        self.run("systemctl", "restart", unit, check=True)

    def wait_active(self, deadline_s=300):
        end = time.monotonic() + deadline_s
        while True:
            states = {u: self.run("systemctl", "is-active", u).stdout.strip() for u in UNITS}
            if all(s in ("active", "failed") for s in states.values()) or time.monotonic() > end:
                return states
            time.sleep(1)

    def facts(self, unit):
        proc = self.run("systemctl", "show", unit, "-p", "ActiveState,Result,NFileDescriptorStore,"
                        "FileDescriptorStoreMax,FileDescriptorStorePreserve,LUOSession,MainPID")
        facts = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        facts["fdstore"] = self.run("systemd-analyze", "fdstore", unit).stdout
        return facts

    def check(self, unit):
        proc = self.run("liveupdate", "check", unit, "--json")
        try:
            return json.loads(proc.stdout)
        except (ValueError, AttributeError):
            return {"error": (proc.stderr if proc else "timeout")[-1000:], "rc": proc.returncode if proc else None}

    def check_text(self, units):
        proc = self.run("liveupdate", "check", *units)
        return proc.stdout if proc else None

    def daemon(self, *words):
        proc = self.run("python3", os.path.join(DAEMON_DIR, "cache_daemon.py"), *words, "--socket", DAEMON_SOCKET)
        return {"rc": proc.returncode, "out": proc.stdout.strip(), "err": proc.stderr.strip()[-300:]} if proc else None


def main():
    stage = int(os.environ["LIVEUPDATE_STAGE"])
    out = os.path.join(os.environ["LIVEUPDATE_VM_OUT"], "tier")
    os.makedirs(os.path.join(out, "reports"), exist_ok=True)
    system = Systemctl(stage)
    observed = run_stage(system, stage)
    for name in os.listdir(REPORTS):
        shutil.copy2(os.path.join(REPORTS, name), os.path.join(out, "reports", name))
    with open("/proc/sys/kernel/random/boot_id") as f:
        observed["boot"] = f.read().strip()
    manager = system.run("systemctl", "show", "-p", "KExecCount")
    observed["manager"] = manager.stdout.strip() if manager else None
    observed["errors"] = system.errors
    with open(os.path.join(out, "stage%d.json" % stage), "w") as f:
        json.dump(observed, f, indent=1, sort_keys=True)
    system.say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
