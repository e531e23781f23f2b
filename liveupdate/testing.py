"""pytest plugin: before/after-kexec tests written once, run on the emulator
anywhere and on a real kernel in a VM.

A test asks for the ``liveupdate_kexec`` fixture and is written as the two
stages of a live update::

    def test_cache_survives(liveupdate_kexec):
        lk = liveupdate_kexec
        if lk.stage == 1:
            dev = lk.open()
            session = lk.keep(dev.create_session("cache"))
            session.preserve(make_memfd(b"hello"), token=1)
            lk.kexec()
        # stage 2: a new kernel
        dev = lk.open()
        session = dev.retrieve_session("cache")
        ...
        session.finish()

Where the test runs decides what ``kexec()`` does:

emulator (default, any machine)
    ``kexec()`` runs :meth:`liveupdate.Emulator.kexec` in the middle of the
    test; the old handles go, ``stage`` turns 2 and the test goes on.
device (in a ``tools/vmtest`` guest: ``LIVEUPDATE_STAGE`` is set)
    stage 1: ``kexec()`` ends the test there (it passes as "stage 1 done");
    the sessions given to ``keep()`` stay open in this very process. When the
    run is over and its results are written, the plugin kexecs into the same
    kernel (``kexec_file_load`` with the running command line) while it still
    holds them. Stage 2, the same pytest command in the new kernel, runs only
    the tests that reached ``kexec()``, from the top with ``stage == 2``.
    Run it as ``tools/vmtest --kexec -- python3 -m pytest ...``.

``LIVEUPDATE_KEXEC_BACKEND=emulator|device`` overrides the choice.

Rules that follow from a real kexec: both stages run from the top, so stage 2
can only use what stage 1 left in the kernel (or in :attr:`KexecHarness.state`,
a JSON-able dict carried across); every session a test keeps must have a name
no other test uses, because all of them cross the same kexec together.

Load the plugin with ``-p liveupdate.testing`` or ``pytest_plugins =
["liveupdate.testing"]`` in a top-level conftest.py.

The guest side of the contract with ``tools/vmtest`` (environment):
``LIVEUPDATE_STAGE`` (1 or 2), ``LIVEUPDATE_VM_OUT`` (a directory that
survives the kexec), ``LIVEUPDATE_VM_KERNEL`` (the image to kexec) and
``LIVEUPDATE_VM_KEXEC=1`` (stage 1 only: a stage 2 will follow). Before it
kexecs the plugin writes pytest's exit status to ``$LIVEUPDATE_VM_OUT/stage1.rc``.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Dict, List, Optional

import pytest

from . import errors

__all__ = ["KexecHarness", "KexecRequested", "liveupdate_kexec"]

FIXTURE = "liveupdate_kexec"
STATE_FILE = "liveupdate-kexec.json"

# What stage 1 on a real kernel holds until the kexec: sessions (and any
# other objects) given to keep(). Module level so nothing, not even a
# test's teardown or the garbage collector, closes them before the jump.
_held: List[Any] = []
# nodeid -> state dict of the tests whose stage 1 reached kexec().
_pending: Dict[str, Dict[str, Any]] = {}


class KexecRequested(BaseException):
    """Raised by :meth:`KexecHarness.kexec` in stage 1 on a real kernel to end
    the test's first half. A BaseException so that a test's own
    ``except Exception`` cannot swallow it."""


def _backend() -> str:
    chosen = os.environ.get("LIVEUPDATE_KEXEC_BACKEND")
    if chosen:
        if chosen not in ("emulator", "device"):
            raise pytest.UsageError("LIVEUPDATE_KEXEC_BACKEND must be emulator or device, not %r" % chosen)
        return chosen
    return "device" if os.environ.get("LIVEUPDATE_STAGE") else "emulator"


def _vm_stage() -> int:
    try:
        stage = int(os.environ.get("LIVEUPDATE_STAGE", "1"))
    except ValueError:
        stage = 0
    if stage not in (1, 2):
        raise pytest.UsageError("LIVEUPDATE_STAGE must be 1 or 2, not %r" % os.environ.get("LIVEUPDATE_STAGE"))
    return stage


def _state_path() -> Optional[str]:
    out = os.environ.get("LIVEUPDATE_VM_OUT")
    return os.path.join(out, STATE_FILE) if out else None


def _load_pending() -> Dict[str, Dict[str, Any]]:
    path = _state_path()
    if path is None or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f).get("pending", {}))


class KexecHarness:
    """The ``liveupdate_kexec`` fixture's value: one test's view of a live update.

    ``stage`` is 1 before the kexec and 2 after; ``backend`` is "emulator" or
    "device"; ``emulator`` is the test's own :class:`liveupdate.Emulator`
    (None on a device); ``state`` is a JSON-able dict that stage 2 finds as
    stage 1 left it."""

    def __init__(self, backend: str, stage: int, nodeid: str,
                 state: Optional[Dict[str, Any]] = None, emulator: Any = None) -> None:
        self.backend = backend
        self.stage = stage
        self.nodeid = nodeid
        self.emulator = emulator
        self.state: Dict[str, Any] = state if state is not None else {}
        self._devices: List[Any] = []
        self._kept: List[Any] = []

    def open(self, **kwargs: Any) -> Any:
        """Open the Live Update device of this stage's kernel (closed at the
        end of the test; sessions outlive it, as on the kernel)."""
        if self.backend == "emulator":
            device = self.emulator.open(**kwargs)
        else:
            import liveupdate

            device = liveupdate.open(backend="device", **kwargs)
        self._devices.append(device)
        return device

    def keep(self, obj: Any) -> Any:
        """Keep ``obj`` (a session, an fd, or anything with ``close()``)
        alive and open until the kexec; returns it. On the emulator it is
        closed right after the kexec, as a real kexec would have."""
        self._kept.append(obj)
        if self.backend == "device":
            _held.append(obj)
        return obj

    def kexec(self) -> None:
        """Live-update now: what was kept crosses into a new kernel.

        On the emulator this returns in stage 2 with the old kernel's handles
        closed. On a real kernel stage 1 ends here (the kexec comes after the
        run); in stage 2 it is an error to call it again."""
        if self.stage != 1:
            raise errors.make(errno.EINVAL, "kexec", "this test already went through its kexec",
                              test=self.nodeid)
        if self.backend == "emulator":
            self.emulator.kexec()
            self._forget_old_kernel()
            self.stage = 2
            return
        if not os.environ.get("LIVEUPDATE_VM_KEXEC"):
            pytest.skip("no stage 2 follows this run on the real kernel; run it with "
                        "tools/vmtest --kexec (or set LIVEUPDATE_KEXEC_BACKEND=emulator)")
        raise KexecRequested()

    def _forget_old_kernel(self) -> None:
        # A real kexec ends every process, so its handles just vanish; in one
        # process the emulator's old handles must be let go explicitly, and
        # they may answer ESTALE while doing so.
        for obj in self._devices + self._kept:
            try:
                if isinstance(obj, int):
                    os.close(obj)
                else:
                    obj.close()
            except OSError:
                pass
        self._devices = []
        self._kept = []

    def _teardown(self) -> None:
        for device in self._devices:
            try:
                device.close()
            except OSError:
                pass
        self._devices = []
        if self.backend == "emulator":
            self._forget_old_kernel()

    def __repr__(self) -> str:
        return "<liveupdate_kexec %s stage %d>" % (self.backend, self.stage)


@pytest.fixture
def liveupdate_kexec(request: pytest.FixtureRequest) -> Any:
    """A two-stage live update test harness (see :mod:`liveupdate.testing`)."""
    backend = _backend()
    nodeid = request.node.nodeid
    if backend == "emulator":
        try:
            from .emulator import Emulator
        except ImportError as exc:
            pytest.skip("the emulator is not available here: %s" % exc)
        harness = KexecHarness("emulator", 1, nodeid, emulator=Emulator())
    else:
        if not os.path.exists("/dev/liveupdate"):
            pytest.skip("no /dev/liveupdate on this kernel (LIVEUPDATE_KEXEC_BACKEND=device)")
        stage = _vm_stage()
        state = _pending.get(nodeid) if stage == 2 else None
        if stage == 2 and state is None:
            pytest.skip("its stage 1 did not reach kexec() (see the stage-1 results)")
        harness = KexecHarness("device", stage, nodeid, state=dict(state or {}))
    request.node._liveupdate_kexec = harness
    yield harness
    harness._teardown()


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is None or not isinstance(excinfo[1], KexecRequested):
        return
    harness: KexecHarness = pyfuncitem._liveupdate_kexec  # type: ignore[attr-defined]
    _pending[pyfuncitem.nodeid] = harness.state
    pyfuncitem.user_properties.append(("liveupdate_kexec", "stage 1 done; continues after the kexec"))
    outcome.force_result(True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "liveupdate_kexec: a two-stage before/after-kexec test")
    if _backend() == "device" and _vm_stage() == 2:
        _pending.update(_load_pending())


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if not (_backend() == "device" and _vm_stage() == 2):
        return
    # Stage 2 is the second half of the kexec tests only: the rest of the
    # selection already ran in stage 1.
    keep, drop = [], []
    for item in items:
        (keep if FIXTURE in getattr(item, "fixturenames", ()) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not (_backend() == "device" and _vm_stage() == 1 and _pending
            and os.environ.get("LIVEUPDATE_VM_KEXEC")):
        return
    config = session.config
    try:
        _prepare_kexec(int(session.exitstatus))
    except OSError as exc:
        _say(config, "liveupdate.testing: cannot kexec: %s" % exc)
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
        return
    config._liveupdate_kexec_ready = True  # type: ignore[attr-defined]


def _prepare_kexec(exitstatus: int) -> None:
    from . import kexec

    out = os.environ.get("LIVEUPDATE_VM_OUT")
    kernel = os.environ.get("LIVEUPDATE_VM_KERNEL")
    if not out or not kernel:
        raise errors.make(errno.EINVAL, "kexec", "LIVEUPDATE_VM_OUT and LIVEUPDATE_VM_KERNEL must be set",
                          out=out, kernel=kernel)
    with open(os.path.join(out, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({"pending": _pending}, f, indent=1, sort_keys=True)
    kexec.load(kernel, reuse_cmdline=True)
    # Written last: a stage1.rc means everything before the jump succeeded.
    with open(os.path.join(out, "stage1.rc"), "w") as f:
        f.write("%d\n" % exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    # The very end of the run: junit xml and the terminal summary are out.
    if not getattr(config, "_liveupdate_kexec_ready", False):
        return
    from . import kexec

    _say(config, "liveupdate.testing: kexec with %d test(s) pending and %d object(s) held"
         % (len(_pending), len(_held)))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        kexec.execute()
    except OSError as exc:
        print("liveupdate.testing: kexec failed: %s" % exc, file=sys.stderr)
        out = os.environ.get("LIVEUPDATE_VM_OUT", "")
        try:
            with open(os.path.join(out, "stage1.rc"), "w") as f:
                f.write("%d\n" % pytest.ExitCode.INTERNAL_ERROR)
        except OSError:
            pass
        os._exit(int(pytest.ExitCode.INTERNAL_ERROR))


def _say(config: pytest.Config, text: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)
    else:
        print(text)
