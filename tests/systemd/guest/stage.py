"""The guest driver of the systemd tier, run once per boot by
``tools/vmtest --systemd --boots 3`` (``LIVEUPDATE_STAGE`` is 1, 2, 3).

Boot 1 installs the services and units (on the disk, which survives the
kexecs), enables and starts them, restarts each once (a plain restart) and
asks ``liveupdate check`` what will survive the kexec. Boots 2 and 3 wait
for the units (started by systemd at boot, with their fd stores restored),
restart each once more (boot 2), and ask again. Every boot copies the
services' reports and its own observations to the share for the host."""
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scenarios import SERVICES  # noqa: E402
from tierlib import REPORTS  # noqa: E402

STAGE = int(os.environ["LIVEUPDATE_STAGE"])
OUT = os.path.join(os.environ["LIVEUPDATE_VM_OUT"], "tier")
LIB = "/usr/local/lib/luo-tier"
# The example daemon, installed where its shipped unit file expects it.
DAEMON_DIR = "/opt/liveupdate/examples/cache_daemon"
DAEMON_UNIT = "cache-daemon.service"
DAEMON_SOCKET = "/run/cache-daemon.sock"
UNITS = list(SERVICES) + [DAEMON_UNIT]
observed = {"stage": STAGE, "errors": []}


def run(*argv, check=False, timeout=300):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        observed["errors"].append("timeout: %s" % " ".join(argv))
        return None
    if check and proc.returncode != 0:
        observed["errors"].append("%s: exit %d: %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()[-500:]))
    return proc


def say(text):
    print("tier stage %d: %s" % (STAGE, text), flush=True)


def install():
    for sub in ("services",):
        shutil.copytree(os.path.join(HERE, sub), os.path.join(LIB, sub), dirs_exist_ok=True)
    for name in ("tierlib.py", "scenarios.py"):
        shutil.copy2(os.path.join(HERE, name), LIB)
    os.makedirs(REPORTS, exist_ok=True)
    for unit in SERVICES:
        shutil.copy2(os.path.join(HERE, "units", unit), "/etc/systemd/system/")
    shipped = os.path.join(os.path.dirname(HERE), "cache_daemon")
    os.makedirs(DAEMON_DIR, exist_ok=True)
    shutil.copy2(os.path.join(shipped, "cache_daemon.py"), DAEMON_DIR)
    shutil.copy2(os.path.join(shipped, DAEMON_UNIT), "/etc/systemd/system/")
    verify = run("systemd-analyze", "verify", *["/etc/systemd/system/" + u for u in UNITS])
    observed["verify"] = {"rc": verify.returncode, "output": (verify.stdout + verify.stderr)[-2000:]}
    run("systemctl", "daemon-reload", check=True)
    run("systemctl", "enable", *UNITS, check=True)


def wait_active(deadline_s=300):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        states = {u: run("systemctl", "is-active", u).stdout.strip() for u in UNITS}
        if all(s in ("active", "failed") for s in states.values()):
            return states
        time.sleep(1)
    return states


def unit_facts(unit):
    proc = run("systemctl", "show", unit, "-p", "ActiveState,Result,NFileDescriptorStore,"
               "FileDescriptorStoreMax,FileDescriptorStorePreserve,LUOSession,MainPID")
    facts = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    store = run("systemd-analyze", "fdstore", unit)
    facts["fdstore"] = store.stdout
    return facts


def snapshot(label):
    observed.setdefault("units", {})[label] = {u: unit_facts(u) for u in UNITS}


def check(label):
    results = {}
    for unit in UNITS:
        proc = run("liveupdate", "check", unit, "--json")
        try:
            results[unit] = json.loads(proc.stdout)
        except (ValueError, AttributeError):
            results[unit] = {"error": (proc.stderr if proc else "timeout")[-1000:],
                             "rc": proc.returncode if proc else None}
    observed.setdefault("check", {})[label] = results
    # The words an operator reads, for the README.
    text = run("liveupdate", "check", "luo-drop.service", DAEMON_UNIT)
    observed.setdefault("check text", {})[label] = text.stdout if text else None


def daemon(*words):
    proc = run("python3", os.path.join(DAEMON_DIR, "cache_daemon.py"), *words, "--socket", DAEMON_SOCKET)
    return {"rc": proc.returncode, "out": proc.stdout.strip(), "err": proc.stderr.strip()[-300:]} if proc else None


def talk_to_daemon(label):
    """What the example daemon serves now, then one more key for this boot."""
    seen = {key: daemon("get", key) for key in ("greeting", "boot1", "boot2", "boot3")}
    seen["stats"] = daemon("stats")
    if label == "after start":
        seen["set"] = daemon("set", "boot%d" % STAGE, "written in boot %d" % STAGE)
        if STAGE == 1:
            seen["set greeting"] = daemon("set", "greeting", "hello from the first kernel")
    observed.setdefault("daemon", {})[label] = seen


def collect():
    os.makedirs(os.path.join(OUT, "reports"), exist_ok=True)
    for name in os.listdir(REPORTS):
        shutil.copy2(os.path.join(REPORTS, name), os.path.join(OUT, "reports", name))
    with open("/proc/sys/kernel/random/boot_id") as f:
        observed["boot"] = f.read().strip()
    manager = run("systemctl", "show", "-p", "KExecCount")
    observed["manager"] = manager.stdout.strip() if manager else None
    with open(os.path.join(OUT, "stage%d.json" % STAGE), "w") as f:
        json.dump(observed, f, indent=1, sort_keys=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    if STAGE == 1:
        say("installing %d units" % len(UNITS))
        install()
        for unit in UNITS:  # one at a time, in the order of their After=
            run("systemctl", "start", unit, check=True)
    say("waiting for the units")
    observed["active"] = wait_active()
    snapshot("after start")
    talk_to_daemon("after start")
    if STAGE < 3:
        say("restarting each unit (a plain restart)")
        for unit in UNITS:
            run("systemctl", "restart", unit, check=True)
        observed["active after restart"] = wait_active()
        snapshot("after restart")
        talk_to_daemon("after restart")
        say("asking liveupdate check what survives the kexec")
        check("before kexec")
    collect()
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
