"""The command lines: ``liveupdate emulator ...`` and ``python -m liveupdate.service ...``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from liveupdate.service import testing

from .conftest import WAIT


def _run(*argv: str, env: dict = None) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(env or {})
    full["PYTHONPATH"] = testing._package_root() + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", *argv], env=full, capture_output=True, text=True, timeout=WAIT)


def test_serve_without_a_socket_path_says_how_to_name_one():
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "LIVEUPDATE_EMULATOR")}
    full = dict(env)
    full["PYTHONPATH"] = testing._package_root()
    for front in (["liveupdate", "emulator"], ["liveupdate.service"]):
        done = subprocess.run([sys.executable, "-m", *front, "serve"], env=full, capture_output=True, text=True,
                              timeout=WAIT)
        assert done.returncode == 1
        assert "--socket" in done.stderr and "XDG_RUNTIME_DIR" in done.stderr
        assert "Traceback" not in done.stderr


def test_serve_refuses_a_second_service_on_the_same_socket(service):
    done = _run("liveupdate", "emulator", "serve", "--socket", service.socket)
    assert done.returncode == 1
    assert "already listening" in done.stderr
    assert service.status()["pid"] == service.pid  # the first one is untouched


def test_status_prints_json(service):
    done = _run("liveupdate", "emulator", "status", "--socket", service.socket)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["pid"] == service.pid and info["boot"] == 0


def test_socket_from_the_environment(service):
    done = _run("liveupdate.service", "kexec", env={"LIVEUPDATE_EMULATOR": service.socket})
    assert done.returncode == 0, done.stderr
    assert service.status()["boot"] == 1


def test_sigterm_stops_the_service_and_removes_its_socket(tmp_path):
    svc = testing.ServiceProcess(tmp_path).start()
    assert os.path.exists(svc.socket)
    assert svc.stop() == 0
    assert not os.path.exists(svc.socket)
