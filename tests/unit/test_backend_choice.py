"""Which kernel ``liveupdate.open()`` talks to, and that the in-process
emulator is never chosen silently: without a device, ``backend="auto"``
warns (once per process) and logs, and ``LIVEUPDATE_BACKEND`` picks the
backend, ``device`` refusing the emulator outright."""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import warnings

import pytest

import liveupdate
from liveupdate import _backends

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_no_device = pytest.mark.skipif(os.path.exists(liveupdate.DEFAULT_PATH),
                                     reason="this kernel has /dev/liveupdate, so open() never falls back")


@pytest.fixture
def fresh_process_state(monkeypatch):
    """As in a process that has not fallen back yet, with no backend chosen
    by the environment."""
    for name in ("LIVEUPDATE_BACKEND", "LIVEUPDATE_EMULATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_backends, "_fallback_told", False)


def _python(code: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("LIVEUPDATE_BACKEND", "LIVEUPDATE_EMULATOR")}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in [REPO, environ.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-c", code], env=environ, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


@needs_no_device
def test_the_fallback_warns_and_logs_once_per_process():
    code = """
import logging, warnings, liveupdate
logging.basicConfig(format="LOG %(name)s %(levelname)s %(message)s")
warnings.simplefilter("always")          # even so: once per process
with warnings.catch_warnings(record=True) as seen:
    for _ in range(3):
        liveupdate.open().close()
for w in seen:
    print("WARN", w.category.__name__, w.message)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stdout.splitlines() if line.startswith("WARN")]
    logged = [line for line in done.stderr.splitlines() if line.startswith("LOG")]
    assert len(warned) == 1 and len(logged) == 1, done.stdout + done.stderr
    assert warned[0].startswith("WARN EmulatorFallbackWarning no /dev/liveupdate on this kernel: ")
    assert logged[0].startswith("LOG liveupdate WARNING no /dev/liveupdate on this kernel: ")
    for line in warned + logged:
        assert "do not survive a real kexec" in line and "LIVEUPDATE_BACKEND=device" in line


@needs_no_device
def test_without_logging_configured_the_fallback_is_said_once():
    done = _python("import liveupdate\nliveupdate.open().close()\nliveupdate.open().close()\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("no /dev/liveupdate on this kernel") == 1, done.stderr
    assert "EmulatorFallbackWarning" in done.stderr


@needs_no_device
def test_the_warning_points_at_the_caller(fresh_process_state):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        liveupdate.open().close()
    assert [w.category for w in seen] == [liveupdate.EmulatorFallbackWarning]
    assert seen[0].filename == __file__


@needs_no_device
def test_the_fallback_logs_on_the_liveupdate_logger(fresh_process_state, caplog):
    with caplog.at_level(logging.WARNING, logger="liveupdate"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        liveupdate.open().close()
    assert [(r.name, r.levelno) for r in caplog.records] == [("liveupdate", logging.WARNING)]


@needs_no_device
def test_an_error_filter_makes_every_fallback_fail():
    code = """
import warnings, liveupdate
warnings.simplefilter("error", liveupdate.EmulatorFallbackWarning)
for attempt in range(2):
    try:
        liveupdate.open().close()
    except liveupdate.EmulatorFallbackWarning as exc:
        print("refused", attempt)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["refused 0", "refused 1"]


@needs_no_device
def test_backend_device_from_the_environment_refuses_the_emulator(fresh_process_state, monkeypatch):
    monkeypatch.setenv("LIVEUPDATE_BACKEND", "device")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError) as info:
            liveupdate.open()
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == (
        "[Errno 2] open(path='/dev/liveupdate'): No such file or directory (ENOENT): this kernel has no "
        "Live Update device: it needs Linux 7.x built with CONFIG_LIVEUPDATE and booted with liveupdate=on; "
        "LIVEUPDATE_BACKEND=device forbids falling back to the emulator")


def test_backend_device_from_the_environment_refuses_an_emulator_argument(fresh_process_state, monkeypatch):
    monkeypatch.setenv("LIVEUPDATE_BACKEND", "device")
    with pytest.raises(liveupdate.InvalidArgumentError) as info:
        liveupdate.open(emulator="/run/some.sock")
    assert str(info.value) == ("[Errno 22] open(emulator='/run/some.sock'): Invalid argument (EINVAL): "
                               "LIVEUPDATE_BACKEND=device refuses the emulator service given by emulator=")


def test_backend_emulator_from_the_environment_is_chosen_without_a_warning(fresh_process_state, monkeypatch):
    monkeypatch.setenv("LIVEUPDATE_BACKEND", "emulator")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with liveupdate.open() as dev:
            assert dev.backend == "emulator"


def test_backend_service_from_the_environment(fresh_process_state, monkeypatch, _service_socket):
    monkeypatch.setenv("LIVEUPDATE_BACKEND", "service")
    with pytest.raises(liveupdate.InvalidArgumentError) as info:
        liveupdate.open()
    assert "needs emulator=SOCKET or LIVEUPDATE_EMULATOR" in str(info.value)
    monkeypatch.setenv("LIVEUPDATE_EMULATOR", _service_socket)
    with liveupdate.open(timeout=30) as dev:
        assert dev.backend == "service"


@needs_no_device
def test_backend_auto_in_the_environment_is_the_default_choice(fresh_process_state, monkeypatch):
    monkeypatch.setenv("LIVEUPDATE_BACKEND", "auto")
    with pytest.warns(liveupdate.EmulatorFallbackWarning):
        liveupdate.open().close()


@pytest.mark.parametrize("value", ["Device", "kernel", "device,emulator"])
def test_an_unknown_backend_in_the_environment_is_einval(fresh_process_state, monkeypatch, value):
    monkeypatch.setenv("LIVEUPDATE_BACKEND", value)
    with pytest.raises(liveupdate.InvalidArgumentError) as info:
        liveupdate.open()
    assert str(info.value) == (
        "[Errno 22] open(LIVEUPDATE_BACKEND=%r): Invalid argument (EINVAL): "
        "LIVEUPDATE_BACKEND must be one of auto, device, emulator, service" % value)


def test_an_explicit_backend_is_not_overridden_by_the_environment(fresh_process_state, monkeypatch):
    monkeypatch.setenv("LIVEUPDATE_BACKEND", "device")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with liveupdate.open(backend="emulator") as dev:
            assert dev.backend == "emulator"
