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

Rules that follow from a real kexec, enforced on the emulator as well so that
a test that passes there passes on a kernel:

- both stages run from the top, so stage 2 can only use what stage 1 left in
  the kernel or in :attr:`KexecHarness.state`, a dict that crosses as JSON:
  ``kexec()`` fails the test when it cannot be encoded, and stage 2 gets it
  decoded (a tuple comes back a list, an int key a string);
- only what was given to ``keep()`` crosses: stage 1 ends with its process on
  a real kernel, so at ``kexec()`` the emulator closes every other handle of
  its kernel the test still holds (with a ``ResourceWarning`` naming it, as
  the garbage collector gives for an unclosed session); a session the test
  did not keep is then gone in stage 2 (``retrieve_session`` says ENOENT);
- every session a test keeps must have a name no other test uses, because all
  of them cross the same kexec together.

A daemon that systemd runs asks for ``liveupdate_systemd`` instead: an
emulated service manager that runs the daemon from its own unit file and
plays systemd's part of ``systemctl kexec`` over an emulated kernel, on any
machine (see :mod:`liveupdate.emulator.systemd.fixture`).

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
import fcntl
import gc
import json
import os
import sys
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple, TypeVar

import pytest

from . import _atomic, _port, errors
from .device import Device
from .session import Session

if TYPE_CHECKING:
    from .emulator import Emulator

#: What keep() is given back: the object itself, with its own type.
Kept = TypeVar("Kept")

__all__ = ["KexecHarness", "KexecRequested", "liveupdate_kexec", "liveupdate_systemd"]

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


def _inode(obj: Any) -> Optional[Tuple[int, int]]:
    """What identifies the open file behind a kept object (any dup of it
    is the same), or None when it is closed or has no fd."""
    try:
        fd = obj if isinstance(obj, int) else obj.fileno()
        st = os.fstat(fd)
    except (AttributeError, TypeError, ValueError, OSError):
        return None
    return (st.st_dev, st.st_ino)


def _open_fds() -> List[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


def _is_handle(port: Any, fd: int) -> bool:
    """Whether ``fd`` is one of the emulator's device or session handles as
    the program holds them: the write end of a pipe whose read end (the
    same inode, also "owned") is the emulator's own and must stay."""
    try:
        return port.owns(fd) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
    except OSError:
        return False


def _close_all(objects: List[Any]) -> None:
    """Close each of ``objects`` (fds or objects with close()), all of them
    even when one fails: an OSError is what a stale or already closed
    handle answers and is let go; anything else is raised at the end (the
    first of them), once everything else is closed."""
    first: Optional[BaseException] = None
    for obj in objects:
        try:
            if isinstance(obj, int):
                os.close(obj)
            else:
                obj.close()
        except OSError:
            pass
        except Exception as exc:
            if first is None:
                first = exc
    if first is not None:
        raise first


def _as_json(state: Any) -> Dict[str, Any]:
    """``state`` as stage 2 will see it after crossing as JSON, or the test
    fails saying which entry cannot cross."""
    if not isinstance(state, dict):
        pytest.fail("lk.state must stay a dict (it crosses the kexec as a JSON object), not %s"
                    % type(state).__name__, pytrace=False)
    try:
        return dict(json.loads(json.dumps(state)))
    except (TypeError, ValueError) as exc:
        culprit = ""
        for key, value in state.items():
            try:
                json.dumps({key: value})
            except (TypeError, ValueError):
                culprit = "lk.state[%r] = %s: " % (key, _short_repr(value))
                break
        pytest.fail("lk.state crosses the kexec as JSON, as it must on a real kernel, and cannot here: "
                    "%s%s" % (culprit, exc), pytrace=False)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    (None on a device); ``state`` is a dict that stage 2 finds as stage 1
    left it at ``kexec()``, encoded to JSON and decoded again."""

    def __init__(self, backend: str, stage: int, nodeid: str,
                 state: Optional[Dict[str, Any]] = None, emulator: "Optional[Emulator]" = None) -> None:
        self.backend = backend
        self.stage = stage
        self.nodeid = nodeid
        self.emulator = emulator
        self.state: Dict[str, Any] = state if state is not None else {}
        self._devices: List[Device] = []
        self._kept: List[Any] = []
        self._crossing: Dict[str, Any] = {}

    def open(self, **kwargs: Any) -> Device:
        """Open the Live Update device of this stage's kernel (closed at the
        end of the test; sessions outlive it, as on the kernel)."""
        if self.backend == "emulator":
            device = self._emulator().open(**kwargs)
        else:
            import liveupdate

            device = liveupdate.open(backend="device", **kwargs)
        self._devices.append(device)
        return device

    def _emulator(self) -> "Emulator":
        if self.emulator is None:
            raise errors.make(errno.ENODEV, "open", "this stage runs on the kernel, not an emulator",
                              test=self.nodeid)
        return self.emulator

    def keep(self, obj: Kept) -> Kept:
        """Keep ``obj`` (a session, an fd, or anything with ``close()``)
        alive and open until the kexec; returns it. On the emulator it is
        closed right after the kexec, as a real kexec would have.

        Raises TypeError for anything else (it could never be closed)."""
        if isinstance(obj, bool) or not (isinstance(obj, int) and obj >= 0 or callable(getattr(obj, "close", None))):
            raise TypeError("lk.keep() keeps a session, an fd (an int) or an object with close(), not %s"
                            % _short_repr(obj))
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
        crossing = _as_json(self.state)
        if self.backend == "emulator":
            dropped = self._close_unkept()
            self._emulator().kexec()
            self.state = crossing
            self.stage = 2
            self._forget_old_kernel()
            for what in dropped:
                warnings.warn("%s was not given to lk.keep(): closed at the kexec, as the end of stage 1 "
                              "closes it on a real kernel" % what, ResourceWarning, stacklevel=2)
            return
        if not os.environ.get("LIVEUPDATE_VM_KEXEC"):
            pytest.skip("no stage 2 follows this run on the real kernel; run it with "
                        "tools/vmtest --kexec (or set LIVEUPDATE_KEXEC_BACKEND=emulator)")
        self._crossing = crossing
        raise KexecRequested()

    def _close_unkept(self) -> List[str]:
        """Close every handle of the emulated kernel that the test holds
        but did not keep (what the end of the process does on a real
        kernel), so that it does not cross; what each was."""
        port = self._emulator().port
        spared = {_inode(obj) for obj in self._kept + self._devices}
        unkept = {fd for fd in _open_fds() if _is_handle(port, fd) and _inode(fd) not in spared}
        if not unkept:
            return []
        dropped: List[str] = []
        # The test's Session and Device objects are closed through their
        # own close(), so they read as closed later instead of
        # holding a number that may be reused.
        for obj in gc.get_objects():
            if isinstance(obj, (Session, Device)) and not obj.closed and obj.fileno() in unkept:
                unkept.discard(obj.fileno())
                dropped.append(repr(obj))
                try:
                    obj.close()
                except OSError:
                    pass
        # Bare fds (a detached session, a dup) keep their number, now
        # on /dev/null, so that the test's own os.close() of it later closes
        # nothing else.
        placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for fd in sorted(unkept):
                os.dup2(placeholder, fd, inheritable=False)
                dropped.append("fd %d, a handle of the emulated kernel," % fd)
        finally:
            os.close(placeholder)
        return dropped

    def _forget_old_kernel(self) -> None:
        # A real kexec ends every process, so its handles just vanish; in one
        # process the emulator's old handles must be let go explicitly, and
        # they may answer ESTALE while doing so.
        old, self._devices, self._kept = self._devices + self._kept, [], []
        _close_all(old)

    def _teardown(self) -> None:
        devices, self._devices = self._devices, []
        _close_all(devices)
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


@pytest.fixture
def liveupdate_systemd(tmp_path: Any) -> Any:
    """An emulated systemd over a fresh emulated kernel, for one test: load
    units (``unit()``), ``start()``, ``restart()``, ``kexec()``, read
    ``fd_store()`` (see :mod:`liveupdate.emulator.systemd.fixture`)."""
    from .emulator.systemd.fixture import SystemdHarness

    harness = SystemdHarness(str(tmp_path / "systemd"))
    try:
        yield harness
    finally:
        harness.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is None or not isinstance(excinfo[1], KexecRequested):
        return
    harness: KexecHarness = pyfuncitem._liveupdate_kexec  # type: ignore[attr-defined]
    # The state as kexec() encoded it: a finally: block of the test that
    # ran after it changes nothing that crosses.
    _pending[pyfuncitem.nodeid] = harness._crossing
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
    keep: List[pytest.Item] = []
    drop: List[pytest.Item] = []
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
    except Exception as exc:
        # A bug here, not the machine: the run fails (no kexec, so its
        # stage 2 never starts) and says why, instead of an INTERNALERROR
        # traceback from inside pytest.
        _say(config, "liveupdate.testing: cannot kexec, %d test(s) will not reach stage 2: %s: %s\n%s"
             % (len(_pending), type(exc).__name__, exc, "".join(traceback.format_exc()).rstrip()))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    config._liveupdate_kexec_ready = True  # type: ignore[attr-defined]


def _prepare_kexec(exitstatus: int) -> None:
    from . import kexec

    out = os.environ.get("LIVEUPDATE_VM_OUT")
    kernel = os.environ.get("LIVEUPDATE_VM_KERNEL")
    if not out or not kernel:
        raise errors.make(errno.EINVAL, "kexec", "LIVEUPDATE_VM_OUT and LIVEUPDATE_VM_KERNEL must be set",
                          out=out, kernel=kernel)
    # Encoded in full before the file is touched, and replaced whole: a
    # failure leaves the previous file, never a torn one.
    data = json.dumps({"pending": _pending}, indent=1, sort_keys=True)
    _atomic.write_atomically(os.path.join(out, STATE_FILE), data.encode("utf-8"))
    kexec.load(kernel, reuse_cmdline=True)
    # Written last: a stage1.rc means everything before the jump succeeded.
    with open(os.path.join(out, "stage1.rc"), "w") as f:
        f.write("%d\n" % exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    # The very end of the run: junit xml and the terminal summary are out.
    if not getattr(config, "_liveupdate_kexec_ready", False):
        return
    from . import kexec

    unkept = _close_unkept_sessions()
    _say(config, "liveupdate.testing: kexec with %d test(s) pending and %d object(s) held%s"
         % (len(_pending), len(_held), "; %d session(s) not kept closed" % unkept if unkept else ""))
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


def _close_unkept_sessions() -> int:
    """Just before the real kexec: close the sessions this process still
    holds but no test kept (a test's leftovers that the garbage collector
    has not reached), so that only what was kept crosses, as on the
    emulator. How many."""
    gc.collect()
    spared: Set[Optional[Tuple[int, int]]] = {_inode(obj) for obj in _held}
    closed = 0
    for fd in _open_fds():
        try:
            is_session = _port.fd_link(fd).startswith(_port.KERNEL_SESSION_LINK)
        except OSError:
            continue
        if is_session and _inode(fd) not in spared:
            os.close(fd)
            closed += 1
    return closed


def _say(config: pytest.Config, text: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)
    else:
        print(text)
