"""Run the commands of a group of console blocks in one bash, as a reader
typing them would, and report what each printed (run by test_blocks.py as
``python run_console.py JOB.json``; the comparison is the test's).

The job gives the commands, how many lines each background command (``&``)
is to print before the next command starts (what the transcript shows for
it: a service's "serving at" line), the working directory and the
environment. Each command's stdout and stderr go to one file, in order, as
on a terminal; stdin is /dev/null.

Whatever the commands leave running is ended here: this process is made
the child subreaper, so that a daemon that left the shell's process group
(``setsid``) is reparented to it, and every descendant still alive at the
end is sent SIGTERM, then SIGKILL, by its pid, and reaped.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

PR_SET_CHILD_SUBREAPER = 36
COMMAND_TIMEOUT_S = 120
READY_TIMEOUT_S = 60


def main(job_file: str) -> int:
    with open(job_file, encoding="utf-8") as f:
        job = json.load(f)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = job["work"]
    shell = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE, cwd=job["cwd"],
                             env=job["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, universal_newlines=True)
    results: List[Dict[str, Any]] = []
    try:
        for n, command in enumerate(job["commands"]):
            results.append(_run(shell, work, n, command))
            if results[-1].get("timed_out"):
                break
        # What the background commands printed by the end, to compare with
        # what their transcript shows.
        for n, command in enumerate(job["commands"][:len(results)]):
            if command["background"]:
                results[n]["final_output"] = _read(os.path.join(work, "out.%d" % n))
    finally:
        _end_everything(shell)
    json.dump(results, sys.stdout)
    return 0


def _run(shell: "subprocess.Popen[str]", work: str, n: int, command: Dict[str, Any]) -> Dict[str, Any]:
    out = os.path.join(work, "out.%d" % n)
    rc = os.path.join(work, "rc.%d" % n)
    text = command["text"]
    assert shell.stdin is not None
    if command["background"]:
        body = text.split(" #", 1)[0].rstrip()[:-1]
        shell.stdin.write("{ %s\n} < /dev/null > %s 2>&1 &\necho started > %s\n" % (body, out, rc))
    else:
        shell.stdin.write("{ %s\n} < /dev/null > %s 2>&1\necho $? > %s\n" % (text, out, rc))
    shell.stdin.flush()
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while not _complete(rc) and time.monotonic() < deadline and shell.poll() is None:
        time.sleep(0.02)
    if not _complete(rc):
        return {"output": _read(out), "rc": None, "timed_out": True}
    if command["background"]:
        # Ready when it has printed what the transcript shows for it.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(_read(out).splitlines()) < command["wait_lines"] and time.monotonic() < deadline:
            time.sleep(0.02)
        return {"output": _read(out), "rc": None}
    return {"output": _read(out), "rc": int(_read(rc).strip())}


def _complete(path: str) -> bool:
    return _read(path).endswith("\n")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _children() -> List[int]:
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == me:
            found.append(int(name))
    return found


def _end_everything(shell: "subprocess.Popen[str]") -> None:
    try:
        os.killpg(shell.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for _ in range(100):
            _reap()
            alive = _children()
            if not alive:
                return
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
