"""Find out whether Live Update works on this machine, and why not.

Everything here only reads files (``/proc``, ``/sys``, ``/dev``, ``/boot``)
and never opens ``/dev/liveupdate``: the kernel lets one process hold it at
a time, and a status check must not take it from a daemon. The four roots
can point at a fake tree, which is how the tests check each verdict.
"""
from __future__ import annotations

import os
import platform
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .status_sources import (
    DEVICE_NAME,
    Roots,
    ask_service,
    cmdline_param,
    has_cap,
    holders,
    kernel_config,
    kernel_log,
    kstrtobool,
    name_of,
    read_text,
)

__all__ = ["Roots", "Check", "Report", "probe", "kstrtobool", "cmdline_param"]

CAP_SYS_BOOT = 22

_CONFIG_KEYS = (
    "CONFIG_LIVEUPDATE",
    "CONFIG_LIVEUPDATE_MEMFD",
    "CONFIG_KEXEC_HANDOVER",
    "CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT",
    "CONFIG_KEXEC_HANDOVER_DEBUGFS",
    "CONFIG_KEXEC_FILE",
)
_CMDLINE_FIX = (
    "add liveupdate=on to the kernel command line (GRUB: GRUB_CMDLINE_LINUX in /etc/default/grub, "
    "then update-grub) and reboot"
)
_NUMBER_RE = re.compile(r"liveupdate number: (\d+)")
_KHO_FROM_RE = re.compile(r"KHO: exec from: (\S+) \(count (\d+)\)")
#: The only kernel log lines the number needs (beside the first).
_LOG_WANTED = re.compile(f"{_NUMBER_RE.pattern}|{_KHO_FROM_RE.pattern}")


@dataclass
class Check:
    """One thing looked at: ``status`` is "ok", "no" (a problem), "unknown"
    (could not tell) or "info"; ``fix`` says what to do about a problem."""

    id: str
    label: str
    status: str
    text: str
    fix: Optional[str] = None
    #: For the summary line: the problem in a few words.
    short: Optional[str] = None
    #: The raw facts behind the verdict, for --json.
    data: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    usable: bool
    summary: str
    backend: Dict[str, Any]
    liveupdate_number: Dict[str, Any]
    checks: List[Check] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _backend(roots: Roots, environ: Mapping[str, str], device_exists: bool) -> Dict[str, Any]:
    # Mirrors liveupdate.open(backend="auto"): the device wherever it exists,
    # else the service named by $LIVEUPDATE_EMULATOR, else in-process.
    service = environ.get("LIVEUPDATE_EMULATOR") or None
    if device_exists:
        return {
            "kind": "device",
            "text": f"liveupdate.open() uses the kernel's {roots.dev}/{DEVICE_NAME}: "
            "sessions really survive a kexec",
        }
    if service:
        answer = ask_service(service)
        if answer.get("pid") is not None:
            where = (f" (running: pid {answer['pid']}, boot {answer.get('boot')}, "
                     f"{answer.get('sessions_handed_out', 0)} session handles given out)")
        else:
            error = str(answer.get("error"))
            hint = "" if "emulator serve" in error else "; start it with `liveupdate emulator serve`"
            where = f" (not answering: {error}{hint})"
        return {
            "kind": "service",
            "address": service,
            "service": answer,
            "text": f"liveupdate.open() uses the emulator service at {service} (from LIVEUPDATE_EMULATOR){where}: "
            "sessions survive the exit of their process and an emulated kexec (`liveupdate emulator kexec`), "
            "not a real one",
        }
    return {
        "kind": "emulator",
        "text": "liveupdate.open() uses the in-process emulator: sessions live as long as the process and "
        "survive only an emulated kexec (Emulator.kexec()); set LIVEUPDATE_EMULATOR to share one "
        "emulator service between processes",
    }


def probe(roots: Roots = Roots(), environ: Optional[Mapping[str, str]] = None) -> Report:
    """Look at the machine under ``roots`` and say whether Live Update is
    usable there, with one :class:`Check` per fact."""
    env = os.environ if environ is None else environ
    proc, sysfs = Path(roots.proc), Path(roots.sys)
    release_text, _ = read_text(proc / "sys" / "kernel" / "osrelease")
    release = (release_text or platform.release()).strip()
    checks = [Check("kernel", "kernel", "info", f"Linux {release} on {platform.machine()}")]

    config, config_source, config_problems = kernel_config(roots, release)
    checks.append(_config_check(config, config_source, config_problems))
    cmdline_check, luo_on, kho_param = _cmdline_check(roots)
    checks.append(cmdline_check)
    debugfs = sysfs / "kernel" / "debug"
    try:
        debugfs_mounted = any(True for _ in os.scandir(debugfs))
    except OSError:
        debugfs_mounted = False
    checks.append(_kho_check(debugfs, debugfs_mounted, config, kho_param))
    registered_check, registered, dev_numbers = _registered_check(roots)
    checks.append(registered_check)
    device_check, device_exists, usable = _device_check(roots, registered, dev_numbers)
    checks.append(device_check)
    checks.append(_holders_check(roots))
    boot_check, from_kexec = _boot_check(debugfs, debugfs_mounted)
    checks.append(boot_check)
    number = _liveupdate_number(roots, registered or luo_on, from_kexec)
    known = number["value"] is not None or not (registered or luo_on)
    checks.append(Check("number", "liveupdate number", "info" if known else "unknown", number["text"],
                        number.get("fix")))
    checks.append(_kexec_check(roots, config))

    backend = _backend(roots, env, device_exists)
    if usable:
        summary = "Live Update is usable here: sessions created now survive a kexec into a kernel booted with liveupdate=on."
    else:
        problems = [c.short or c.text for c in checks if c.status == "no"]
        why = problems[0] if problems else "the device is not available"
        summary = f"Live Update is not usable on this kernel: {why}. Programs get an emulator instead."
    return Report(usable, summary, backend, number, checks)


def _config_check(config: Optional[Dict[str, str]], source: str, problems: List[str]) -> Check:
    """What the kernel was built with (its config, when readable)."""
    damaged = "; ".join(problems)
    if config is None:
        if problems:
            # There but unusable: say what is wrong with it, not "missing".
            return Check("config", "kernel config", "unknown",
                         f"cannot use the kernel config: {damaged}; the checks below look at the running kernel "
                         f"instead", "the file is damaged or not what its name says; the kernel itself is not "
                         "affected", data={"problems": problems})
        # Not a problem: the checks below read the running kernel itself.
        return Check("config", "kernel config", "info",
                     f"not readable here (no {source}); the checks below look at the running kernel instead")
    facts: Dict[str, Any] = {key: config.get(key, "n") for key in _CONFIG_KEYS}
    facts["source"] = source
    where = f"read from {source}" + (f"; ignored {damaged}" if problems else "")
    if problems:
        facts["problems"] = problems
    missing = [key for key in ("CONFIG_LIVEUPDATE", "CONFIG_KEXEC_HANDOVER", "CONFIG_LIVEUPDATE_MEMFD")
               if config.get(key) != "y"]
    built = config.get("CONFIG_LIVEUPDATE") == "y" and config.get("CONFIG_KEXEC_HANDOVER") == "y"
    if not missing:
        return Check("config", "kernel config", "ok",
                     f"built with CONFIG_LIVEUPDATE, CONFIG_LIVEUPDATE_MEMFD and CONFIG_KEXEC_HANDOVER ({where})",
                     data=facts)
    if built:
        return Check("config", "kernel config", "no",
                     f"built with Live Update but without CONFIG_LIVEUPDATE_MEMFD: no memfd can be preserved "
                     f"({where})",
                     "build the kernel with CONFIG_LIVEUPDATE_MEMFD=y", "memfds cannot be preserved", data=facts)
    return Check("config", "kernel config", "no",
                 f"this kernel was built without Live Update: {', '.join(missing)} not set ({where})",
                 "boot a kernel (Linux 7.x) built with CONFIG_LIVEUPDATE=y and CONFIG_KEXEC_HANDOVER=y",
                 "the kernel was built without it", data=facts)


def _cmdline_check(roots: Roots) -> Tuple[Check, bool, Optional[bool]]:
    """What the kernel was booted with: (check, liveupdate on, kho= value)."""
    proc = Path(roots.proc)
    cmdline, cmd_err = read_text(proc / "cmdline")
    if cmdline is None:
        return (Check("cmdline", "command line", "unknown", f"cannot read {proc}/cmdline ({cmd_err})",
                      "mount /proc"), False, None)
    kho_param: Optional[bool] = None
    kho_present, kho_value = cmdline_param(cmdline, "kho")
    if kho_present:
        kho_param = kstrtobool(kho_value)
    present, value = cmdline_param(cmdline, "liveupdate")
    luo_on = kstrtobool(value) is True
    if luo_on:
        check = Check("cmdline", "command line", "ok", f"liveupdate={value} is on the kernel command line")
    elif present:
        check = Check("cmdline", "command line", "no",
                      f"the kernel command line says liveupdate={value or ''}, which keeps Live Update off",
                      _CMDLINE_FIX, "liveupdate=on is not on the kernel command line")
    else:
        check = Check("cmdline", "command line", "no",
                      "liveupdate=on is not on the kernel command line, so the kernel keeps Live Update off",
                      _CMDLINE_FIX, "liveupdate=on is not on the kernel command line")
    return check, luo_on, kho_param


def _kho_check(debugfs: Path, debugfs_mounted: bool, config: Optional[Dict[str, str]],
               kho_param: Optional[bool]) -> Check:
    """Kexec HandOver: debugfs says for sure, else the command line and the config."""
    kho_dir = debugfs / "kho"
    if debugfs_mounted and kho_dir.is_dir():
        return Check("kho", "Kexec HandOver", "ok", f"KHO is enabled ({kho_dir} exists)")
    kho_default = None if config is None else config.get("CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT") == "y"
    kho = kho_param if kho_param is not None else kho_default
    if kho_param:
        why = "kho=on is on the command line"
    elif kho_param is False:
        why = "kho=off is on the command line"
    elif kho_default:
        why = "on by default: CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y"
    else:
        why = "not on by default and no kho=on on the command line"
    if config is not None and config.get("CONFIG_KEXEC_HANDOVER") != "y":
        kho, why = False, "not built into this kernel"
    if kho is True:
        return Check("kho", "Kexec HandOver", "ok", f"KHO is enabled ({why})")
    if kho is False:
        return Check("kho", "Kexec HandOver", "no",
                     f"KHO is off ({why}); Live Update hands everything over through it",
                     "boot with kho=on (and a kernel built with CONFIG_KEXEC_HANDOVER=y)", "KHO is off")
    return Check("kho", "Kexec HandOver", "unknown",
                 "cannot tell whether KHO is enabled (no kernel config, no kho= parameter, debugfs not mounted)",
                 f"mount -t debugfs none {debugfs}")


def _registered_check(roots: Roots) -> Tuple[Check, bool, Optional[str]]:
    """Whether the kernel registered the misc device: (check, registered, its major:minor)."""
    sysfs = Path(roots.sys)
    misc = sysfs / "class" / "misc" / DEVICE_NAME
    dev_numbers, _ = read_text(misc / "dev")
    registered = misc.exists()
    if registered:
        return (Check("registered", "Live Update", "ok",
                      f"the kernel has Live Update running (it registered the {DEVICE_NAME} device)"),
                True, dev_numbers)
    if (sysfs / "class").is_dir():
        return (Check("registered", "Live Update", "no",
                      "the kernel has Live Update off (no device registered in sysfs)",
                      "see the checks above, or the kernel log: dmesg | grep -i -e liveupdate -e luo -e KHO",
                      "the kernel has it off"), False, dev_numbers)
    return (Check("registered", "Live Update", "unknown", f"{sysfs} is not mounted", f"mount -t sysfs sysfs {sysfs}"),
            False, dev_numbers)


def _device_check(roots: Roots, registered: bool, dev_numbers: Optional[str]) -> Tuple[Check, bool, bool]:
    """The device node: (check, it exists, this user may open it)."""
    node = Path(roots.dev) / DEVICE_NAME
    device_exists = os.path.exists(node)
    try:
        st = os.stat(node)
    except OSError:
        fix = None
        if registered and dev_numbers:
            major, _, minor = dev_numbers.strip().partition(":")
            fix = f"create the node: mknod {node} c {major} {minor} (or mount devtmpfs on {roots.dev})"
        return Check("device", "device", "no", f"{node} does not exist", fix, f"{node} does not exist"), \
            device_exists, False
    if not stat.S_ISCHR(st.st_mode):
        return (Check("device", "device", "no", f"{node} exists but is not a character device",
                      "remove it; the kernel's device node appears there when Live Update is on",
                      f"{node} is not the device"), device_exists, False)
    owner = name_of(st.st_uid, "pwd")
    group = name_of(st.st_gid, "grp")
    mode = stat.filemode(st.st_mode)
    if os.access(node, os.R_OK | os.W_OK):
        return (Check("device", "device", "ok", f"{node} is there ({mode} {owner}:{group}) and this user may open it"),
                device_exists, True)
    return (Check("device", "device", "no", f"{node} is there ({mode} {owner}:{group}) but this user may not open it",
                  f"run as root, or give this user access (e.g. chgrp a group of yours {node}; chmod g+rw {node})",
                  f"this user may not open {node}"), device_exists, False)


def _holders_check(roots: Roots) -> Check:
    """Which processes hold the device or sessions."""
    holding, hidden = holders(roots)
    if not (holding or hidden):
        return Check("holders", "in use by", "info", "no process holds the device or a session",
                     data={"processes": [], "not_visible": 0})
    parts = []
    for item in holding:
        what = []
        if item["device"]:
            what.append(f"holds {roots.dev}/{DEVICE_NAME}")
        if item["sessions"]:
            what.append(f"{item['sessions']} session fd{'s' if item['sessions'] != 1 else ''}")
        parts.append(f"pid {item['pid']} ({item['command']}): {', '.join(what)}")
    text = "; ".join(parts) if parts else "none seen"
    if hidden:
        text += f"; {hidden} processes not visible to this user (run as root to see them)"
    return Check("holders", "in use by", "info", text, data={"processes": holding, "not_visible": hidden})


def _boot_check(debugfs: Path, debugfs_mounted: bool) -> Tuple[Check, Optional[bool]]:
    """Whether this kernel came from a KHO kexec: (check, True/False/None)."""
    kho_in = debugfs / "kho" / "in"
    if not debugfs_mounted:
        return (Check("boot", "this boot", "unknown",
                      "cannot tell whether this kernel came from a KHO kexec: debugfs is not mounted",
                      f"mount -t debugfs none {debugfs}, then look for {kho_in}"), None)
    from_kexec = kho_in.exists()
    text = ("this kernel was started by a KHO kexec: it received state from the previous kernel"
            if from_kexec else "this kernel was not started by a KHO kexec (a cold boot, or a kexec without KHO)")
    return Check("boot", "this boot", "info", text), from_kexec


def _liveupdate_number(roots: Roots, enabled: bool, from_kexec: Optional[bool]) -> Dict[str, Any]:
    """The number of live updates since the last cold boot, from the kernel
    log (the kernel reports it nowhere else once booted)."""
    lines, error = kernel_log(roots, _LOG_WANTED)
    where = "the kernel log: dmesg | grep 'liveupdate number'"
    if lines is None:
        return {"value": None, "source": None,
                "text": f"cannot read the kernel log ({error}); the number is in {where}",
                "fix": "run as root to read it"}
    found = None
    kexec_from = None
    for line in lines:
        match = _NUMBER_RE.search(line)
        if match:
            found = int(match.group(1))
        match = _KHO_FROM_RE.search(line)
        if match:
            kexec_from = {"release": match.group(1), "kexec_count": int(match.group(2))}
    result: Dict[str, Any] = {"value": None, "source": "kernel log"}
    if kexec_from:
        result["previous_kernel"] = kexec_from
    if found is not None:
        result["value"] = found
        result["text"] = (f"{found}: this kernel received Live Update state from the previous one; "
                          f"the next kexec makes it {found + 1}")
        return result
    complete = bool(lines) and lines[0].startswith("Linux version")
    if complete and enabled:
        result["value"] = 0
        result["text"] = ("0: no Live Update state was handed to this kernel (cold boot, or the previous "
                          "kernel preserved nothing)")
        return result
    if not enabled:
        result["text"] = "none: Live Update is off in this kernel"
        result["value"] = None
        return result
    result["text"] = f"not in the kernel log any more (it rotated since boot); it was in {where}"
    return result


def _kexec_check(roots: Roots, config: Optional[Dict[str, str]]) -> Check:
    status_text, _ = read_text(Path(roots.proc) / "self" / "status")
    cap = has_cap(status_text, CAP_SYS_BOOT)
    disabled_text, _ = read_text(Path(roots.proc) / "sys" / "kernel" / "kexec_load_disabled")
    loaded_text, _ = read_text(Path(roots.sys) / "kernel" / "kexec_loaded")
    facts = []
    problems = []
    fix = None
    if config is not None and config.get("CONFIG_KEXEC_FILE") != "y":
        problems.append("this kernel cannot load another with kexec_file_load (CONFIG_KEXEC_FILE is not set)")
        fix = "boot a kernel built with CONFIG_KEXEC_FILE=y"
    if disabled_text is not None and disabled_text.strip() == "1":
        problems.append("kexec is disabled until the next boot (kernel.kexec_load_disabled=1)")
        fix = fix or "reboot: kexec_load_disabled cannot be turned back off"
    if cap is False:
        problems.append("this user lacks CAP_SYS_BOOT")
        fix = fix or "run `liveupdate kexec` as root"
    if loaded_text is not None:
        facts.append("a kernel is loaded for kexec" if loaded_text.strip() == "1" else "no kernel is loaded for kexec")
    if problems:
        return Check("kexec", "kexec", "no", "; ".join(problems + facts), fix)
    if config is None and loaded_text is None:
        return Check("kexec", "kexec", "unknown", "cannot tell whether this kernel can kexec",
                     "try `liveupdate kexec load KERNEL --dry-run`, then without --dry-run")
    return Check("kexec", "kexec", "ok", "; ".join(["this kernel can kexec_file_load the next one"] + facts))
