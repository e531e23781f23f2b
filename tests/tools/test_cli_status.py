"""``liveupdate status``: this machine's real answer, and each verdict on a
fake /proc, /sys, /dev and /boot built here."""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

import liveupdate
from liveupdate.cli import main
from liveupdate.cli.status_probe import Roots, cmdline_param, kstrtobool, probe

GOOD_CONFIG = """\
CONFIG_KEXEC_FILE=y
CONFIG_KEXEC_HANDOVER=y
CONFIG_KEXEC_HANDOVER_DEBUGFS=y
CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y
CONFIG_LIVEUPDATE=y
CONFIG_LIVEUPDATE_MEMFD=y
"""

BOOT_LOG = [
    "5,0,0,-;Linux version 7.3.4 (builder@host) #1 SMP",
    "6,1,10,-;KHO: exec from: 7.3.3 (count 2)",
    " SUBSYSTEM=none",
    "6,2,20,-;luo_core: Retrieved live update data, liveupdate number: 2",
]


def run_cli(argv: List[str]) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def build_tree(
    root: Path,
    *,
    cmdline: str = "console=ttyS0 root=/dev/vda liveupdate=on",
    config: Optional[str] = GOOD_CONFIG,
    config_in_boot: bool = False,
    registered: bool = True,
    device: Optional[str] = "char",
    debugfs: bool = True,
    from_kexec: bool = True,
    log: Optional[List[str]] = None,
    holders: bool = True,
    kexec_loaded: str = "0",
) -> Roots:
    """A machine as the kernel shows it, in files: by default one where
    live update works and that came from a KHO kexec."""
    proc, sysfs, dev, boot = (root / name for name in ("proc", "sys", "dev", "boot"))
    for path in (proc / "sys" / "kernel", proc / "self", sysfs / "class" / "misc", sysfs / "kernel", dev, boot):
        path.mkdir(parents=True, exist_ok=True)
    (proc / "cmdline").write_text(cmdline + "\n")
    (proc / "sys" / "kernel" / "osrelease").write_text("7.3.4\n")
    (proc / "sys" / "kernel" / "kexec_load_disabled").write_text("0\n")
    (proc / "self" / "status").write_text("Name:\tliveupdate\nCapEff:\t000001ffffffffff\n")
    if config is not None:
        if config_in_boot:
            (boot / "config-7.3.4").write_text(config)
        else:
            (proc / "config.gz").write_bytes(gzip.compress(config.encode()))
    if registered:
        (sysfs / "class" / "misc" / "liveupdate").mkdir()
        (sysfs / "class" / "misc" / "liveupdate" / "dev").write_text("10:122\n")
    (sysfs / "kernel" / "kexec_loaded").write_text(kexec_loaded + "\n")
    if debugfs:
        (sysfs / "kernel" / "debug" / "kho" / "out").mkdir(parents=True)
        if from_kexec:
            (sysfs / "kernel" / "debug" / "kho" / "in").mkdir()
    else:
        (sysfs / "kernel" / "debug").mkdir()
    if device == "char":
        # A real character device this user may open: /dev/null stands in.
        os.symlink("/dev/null", dev / "liveupdate")
    elif device == "file":
        (dev / "liveupdate").write_text("")
    (dev / "kmsg").write_text("\n".join(BOOT_LOG if log is None else log) + "\n")
    if holders:
        fd_dir = proc / "4242" / "fd"
        fd_dir.mkdir(parents=True)
        (proc / "4242" / "comm").write_text("cached\n")
        os.symlink("/dev/liveupdate", fd_dir / "3")
        os.symlink("anon_inode:[luo_session]", fd_dir / "4")
        os.symlink("anon_inode:[luo_session]", fd_dir / "5")
        os.symlink("/var/log/cached.log", fd_dir / "6")
        other = proc / "77" / "fd"
        other.mkdir(parents=True)
        os.symlink("/dev/null", other / "0")
    return Roots(proc=str(proc), sys=str(sysfs), dev=str(dev), boot=str(boot))


def tree_args(roots: Roots) -> List[str]:
    return ["--proc", roots.proc, "--sys", roots.sys, "--dev", roots.dev, "--boot", roots.boot]


def checks(report) -> Dict[str, Any]:
    return {check.id: check for check in report.checks}


# -- the kernel's parameter parsing ----------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("on", True), ("1", True), ("y", True), ("Yes", True), ("true", True), ("off", False), ("0", False),
     ("n", False), ("false", False), ("", None), (None, None), ("o", None), ("maybe", None)],
)
def test_kstrtobool(value: Optional[str], expected: Optional[bool]) -> None:
    assert kstrtobool(value) is expected


def test_cmdline_param_last_wins_and_init_args_do_not_count() -> None:
    assert cmdline_param("liveupdate=on quiet liveupdate=off", "liveupdate") == (True, "off")
    assert cmdline_param("quiet -- liveupdate=on", "liveupdate") == (False, None)
    assert cmdline_param("liveupdate", "liveupdate") == (True, None)
    assert cmdline_param("noliveupdate=on", "liveupdate") == (False, None)


# -- verdicts on fake machines ----------------------------------------------


def test_usable_machine(tmp_path) -> None:
    roots = build_tree(tmp_path)
    report = probe(roots, environ={})
    assert report.usable
    found = checks(report)
    assert {key: found[key].status for key in ("config", "cmdline", "kho", "registered", "device", "kexec")} == {
        key: "ok" for key in ("config", "cmdline", "kho", "registered", "device", "kexec")
    }
    assert report.liveupdate_number["value"] == 2
    assert report.liveupdate_number["previous_kernel"] == {"release": "7.3.3", "kexec_count": 2}
    assert "started by a KHO kexec" in found["boot"].text
    assert found["holders"].data["processes"] == [{"pid": 4242, "command": "cached", "device": True, "sessions": 2}]
    assert report.backend["kind"] == "device"


def test_usable_machine_on_the_command_line(tmp_path) -> None:
    roots = build_tree(tmp_path)
    code, out, err = run_cli(["status", "--check"] + tree_args(roots))
    assert code == 0, err
    assert out.startswith("Live Update is usable here")
    assert "[ok] command line" in out
    assert "liveupdate=on is on the kernel command line" in out
    assert "pid 4242 (cached): holds" in out and "2 session fds" in out
    assert "2: this kernel received Live Update state" in out and "makes it 3" in out
    assert "fix:" not in out
    code, out, _ = run_cli(["status", "--json"] + tree_args(roots))
    data = json.loads(out)
    assert data["usable"] is True and data["liveupdate_number"]["value"] == 2
    assert {check["id"] for check in data["checks"]} >= {"cmdline", "kho", "registered", "device", "boot", "number"}


def test_liveupdate_off_on_the_command_line(tmp_path) -> None:
    roots = build_tree(tmp_path, cmdline="root=/dev/vda liveupdate=off", registered=False, device=None,
                       from_kexec=False, log=BOOT_LOG[:1], holders=False)
    report = probe(roots, environ={})
    assert not report.usable
    found = checks(report)
    assert found["cmdline"].status == "no" and "liveupdate=off" in found["cmdline"].text
    assert "add liveupdate=on" in found["cmdline"].fix
    assert found["registered"].status == "no" and found["device"].status == "no"
    assert report.summary.startswith("Live Update is not usable on this kernel: liveupdate=on is not on the kernel")
    assert report.backend["kind"] == "emulator"
    code, out, _ = run_cli(["status", "--check"] + tree_args(roots))
    assert code == 1
    assert "[no] command line" in out and "fix: add liveupdate=on" in out
    code, _, _ = run_cli(["status"] + tree_args(roots))
    assert code == 0  # without --check, reporting is success


def test_device_registered_but_node_missing(tmp_path) -> None:
    roots = build_tree(tmp_path, device=None)
    found = checks(probe(roots, environ={}))
    assert found["registered"].status == "ok"
    assert found["device"].status == "no"
    assert f"mknod {roots.dev}/liveupdate c 10 122" in found["device"].fix


def test_device_that_is_not_a_character_device(tmp_path) -> None:
    roots = build_tree(tmp_path, device="file")
    report = probe(roots, environ={})
    assert not report.usable
    assert "not a character device" in checks(report)["device"].text


def test_kernel_built_without_live_update(tmp_path) -> None:
    config = "# CONFIG_LIVEUPDATE is not set\n# CONFIG_KEXEC_HANDOVER is not set\nCONFIG_KEXEC_FILE=y\n"
    roots = build_tree(tmp_path, config=config, config_in_boot=True, registered=False, device=None,
                       debugfs=False, holders=False)
    report = probe(roots, environ={})
    found = checks(report)
    assert found["config"].status == "no"
    assert "CONFIG_LIVEUPDATE, CONFIG_KEXEC_HANDOVER" in found["config"].text
    assert "config-7.3.4" in found["config"].text  # read from /boot when /proc has none
    assert found["kho"].status == "no" and "not built into this kernel" in found["kho"].text
    assert found["boot"].status == "unknown" and "mount -t debugfs" in found["boot"].fix
    assert report.summary.startswith("Live Update is not usable on this kernel: the kernel was built without it.")


def test_kho_off_on_the_command_line(tmp_path) -> None:
    roots = build_tree(tmp_path, cmdline="liveupdate=on kho=off", debugfs=False, registered=False, device=None)
    found = checks(probe(roots, environ={}))
    assert found["kho"].status == "no" and "kho=off" in found["kho"].text


def test_kho_unknown_without_config_or_debugfs(tmp_path) -> None:
    roots = build_tree(tmp_path, config=None, debugfs=False)
    found = checks(probe(roots, environ={}))
    assert found["config"].status == "info" and "not readable here" in found["config"].text
    assert found["kho"].status == "unknown"
    assert found["kexec"].status == "ok"  # kexec_loaded answers for the kernel


def test_cold_boot_has_number_zero(tmp_path) -> None:
    roots = build_tree(tmp_path, from_kexec=False, log=BOOT_LOG[:1])
    report = probe(roots, environ={})
    assert report.liveupdate_number["value"] == 0
    assert "not started by a KHO kexec" in checks(report)["boot"].text


def test_rotated_log_does_not_guess_the_number(tmp_path) -> None:
    roots = build_tree(tmp_path, log=["6,900,99,-;eth0: link up"])
    report = probe(roots, environ={})
    assert report.liveupdate_number["value"] is None
    assert checks(report)["number"].status == "unknown"
    assert "dmesg | grep 'liveupdate number'" in report.liveupdate_number["text"]


def test_kexec_disabled_and_loaded(tmp_path) -> None:
    roots = build_tree(tmp_path, kexec_loaded="1")
    Path(roots.proc, "sys", "kernel", "kexec_load_disabled").write_text("1\n")
    found = checks(probe(roots, environ={}))
    assert found["kexec"].status == "no"
    assert "kexec_load_disabled=1" in found["kexec"].text and "a kernel is loaded" in found["kexec"].text


def test_backend_is_the_service_named_by_the_environment(tmp_path) -> None:
    roots = build_tree(tmp_path, device=None)
    report = probe(roots, environ={"LIVEUPDATE_EMULATOR": str(tmp_path / "emu.sock")})
    assert report.backend["kind"] == "service"
    assert report.backend["address"] == str(tmp_path / "emu.sock")
    assert "liveupdate emulator serve" in report.backend["text"]
    # The real device wins wherever it exists, as for liveupdate.open().
    roots = build_tree(tmp_path / "with-device")
    assert probe(roots, environ={"LIVEUPDATE_EMULATOR": "/x"}).backend["kind"] == "device"


def test_backend_reports_a_running_service(tmp_path) -> None:
    try:
        from liveupdate.service.testing import running_service
    except ImportError as exc:
        pytest.skip(f"the emulator service is not available here: {exc}")
    roots = build_tree(tmp_path / "tree", device=None)
    (tmp_path / "svc").mkdir()
    with running_service(tmp_path / "svc") as address:
        dev = liveupdate.open(emulator=address)
        session = dev.create_session("counted")
        try:
            backend = probe(roots, environ={"LIVEUPDATE_EMULATOR": address}).backend
        finally:
            session.close()
            dev.close()
    assert backend["kind"] == "service"
    assert backend["service"]["sessions_handed_out"] == 1
    assert f"running: pid {backend['service']['pid']}, boot 0, 1 session handles given out" in backend["text"]


# -- this machine -------------------------------------------------------------


def test_this_machine(monkeypatch) -> None:
    monkeypatch.delenv("LIVEUPDATE_EMULATOR", raising=False)
    code, out, err = run_cli(["status", "--json"])
    assert code == 0, err
    data = json.loads(out)
    device = liveupdate.DEFAULT_PATH
    assert data["usable"] == (os.path.exists(device) and os.access(device, os.R_OK | os.W_OK))
    on_cmdline = "liveupdate=on" in Path("/proc/cmdline").read_text().split()
    found = {check["id"]: check for check in data["checks"]}
    assert (found["cmdline"]["status"] == "ok") == on_cmdline
    assert data["backend"]["kind"] == ("device" if os.path.exists(device) else "emulator")
    code, text, _ = run_cli(["status"])
    assert code == 0
    assert text.splitlines()[0] == data["summary"]


def test_this_machine_through_python_dash_m() -> None:
    done = subprocess.run([sys.executable, "-m", "liveupdate", "status"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Live Update is" in done.stdout and "backend: liveupdate.open() uses" in done.stdout
