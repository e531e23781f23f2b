"""The ``liveupdate.testing`` harness on its own: what it closes at an
emulated kexec, what it refuses to keep, and how the end of a stage-1 run
on a real kernel fails when the kexec cannot be prepared (faked here: no
device is needed to reach that code)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from liveupdate.emulator import Emulator
from liveupdate.testing import KexecHarness

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def lk():
    harness = KexecHarness("emulator", 1, "test::case", emulator=Emulator())
    yield harness
    harness._teardown()


def test_an_unkept_session_is_closed_at_the_kexec_and_named(lk):
    session = lk.open().create_session("unkept")
    with pytest.warns(ResourceWarning, match=r"<liveupdate.Session 'unkept' fd=\d+ outgoing backend=emulator> "
                                             r"was not given to lk.keep\(\): closed at the kexec"):
        lk.kexec()
    assert session.closed
    with pytest.raises(FileNotFoundError):
        lk.open().retrieve_session("unkept")


def test_a_bare_unkept_fd_keeps_its_number_but_not_the_session(lk):
    fd = lk.open().create_session("bare").detach()
    with pytest.warns(ResourceWarning, match="fd %d, a handle of the emulated kernel, was not given" % fd):
        lk.kexec()
    assert os.readlink("/proc/self/fd/%d" % fd) == os.devnull
    os.close(fd)  # the test's own close closes the placeholder, nothing else
    with pytest.raises(FileNotFoundError):
        lk.open().retrieve_session("bare")


def test_a_kept_session_crosses_even_through_a_dup(lk):
    session = lk.keep(lk.open().create_session("kept"))
    spare = os.dup(session.fileno())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.kexec()
    os.close(spare)
    with lk.open().retrieve_session("kept") as again:
        again.finish()


def test_the_state_crosses_as_json(lk):
    lk.state.update({"t": (1, 2), 7: "seven"})
    lk.kexec()
    assert lk.state == {"t": [1, 2], "7": "seven"}


@pytest.mark.parametrize("state,says", [
    ({"ok": 1, "bad": {1, 2}}, "lk.state['bad'] = {1, 2}: Object of type set is not JSON serializable"),
    ({"bytes": b"x" * 100}, "lk.state['bytes'] = b'xxxxx"),
])
def test_a_state_json_cannot_carry_fails_before_anything_crosses(lk, state, says):
    session = lk.keep(lk.open().create_session("stays"))
    lk.state.update(state)
    with pytest.raises(pytest.fail.Exception) as info:
        lk.kexec()
    assert "lk.state crosses the kexec as JSON, as it must on a real kernel, and cannot here: " in str(info.value)
    assert says in str(info.value)
    assert lk.stage == 1 and not session.closed and lk.emulator.kexecs == 0


def test_a_state_replaced_by_something_else_fails(lk):
    lk.state = [1, 2]  # type: ignore[assignment]
    with pytest.raises(pytest.fail.Exception, match="lk.state must stay a dict .* not list"):
        lk.kexec()


@pytest.mark.parametrize("thing", [object(), True, -1, "fd:3"])
def test_keep_refuses_what_it_could_not_close(lk, thing):
    with pytest.raises(TypeError, match=r"lk.keep\(\) keeps a session, an fd \(an int\) or an object with close\(\)"):
        lk.keep(thing)
    assert lk._kept == []


class _Raises:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def close(self) -> None:
        raise self.exc


def test_cleanup_closes_everything_past_a_failing_close_then_says_so_once(lk):
    dev = lk.open()
    first = lk.keep(dev.create_session("first"))
    lk.keep(_Raises(RuntimeError("boom")))
    lk.keep(_Raises(OSError(errno.ESTALE, "stale")))  # what old handles say: let go
    last = lk.keep(dev.create_session("last"))
    with pytest.raises(RuntimeError, match="boom"):
        lk._teardown()
    assert first.closed and last.closed
    lk._teardown()  # nothing left to fail a second time


# -- the end of a stage-1 run on a real kernel, faked ------------------------

CONFTEST = """
import liveupdate.kexec
import liveupdate.testing

def pytest_configure(config):
    liveupdate.testing._pending["test_x.py::test_pending"] = PENDING
    def load(*args, **kwargs):
        raise LOAD_RAISES
    liveupdate.kexec.load = load
"""


def _stage1_run(tmp_path, pending: str, load_raises: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(CONFTEST.replace("PENDING", pending).replace("LOAD_RAISES", load_raises))
    (tmp_path / "test_x.py").write_text("def test_other():\n    pass\n")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, LIVEUPDATE_KEXEC_BACKEND="device", LIVEUPDATE_STAGE="1", LIVEUPDATE_VM_KEXEC="1",
               LIVEUPDATE_VM_OUT=str(out), LIVEUPDATE_VM_KERNEL=str(tmp_path / "bzImage"),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONPATH=os.pathsep.join(p for p in [REPO, os.environ.get("PYTHONPATH", "")] if p))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "liveupdate.testing", "-p", "no:cacheprovider",
                           "-q", "test_x.py"], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)


def test_a_state_file_that_cannot_be_written_leaves_the_old_one_whole(tmp_path):
    state = tmp_path / "out" / "liveupdate-kexec.json"
    state.parent.mkdir()
    state.write_text('{"pending": {"earlier": {}}}')
    done = _stage1_run(tmp_path, pending="{'handle': object()}", load_raises="AssertionError('not reached')")
    assert done.returncode == 1, done.stdout
    assert "INTERNALERROR" not in done.stdout
    assert "liveupdate.testing: cannot kexec, 1 test(s) will not reach stage 2: TypeError: " in done.stdout
    assert json.loads(state.read_text()) == {"pending": {"earlier": {}}}
    assert sorted(os.listdir(str(state.parent))) == ["liveupdate-kexec.json"]
    assert not (state.parent / "stage1.rc").exists()


def test_an_error_other_than_oserror_while_preparing_the_kexec_fails_the_run(tmp_path):
    done = _stage1_run(tmp_path, pending="{'n': 1}", load_raises="RuntimeError('kexec_file_load wrapper bug')")
    assert done.returncode == 1, done.stdout
    assert "INTERNALERROR" not in done.stdout
    assert ("liveupdate.testing: cannot kexec, 1 test(s) will not reach stage 2: "
            "RuntimeError: kexec_file_load wrapper bug") in done.stdout
    assert json.loads((tmp_path / "out" / "liveupdate-kexec.json").read_text()) == {
        "pending": {"test_x.py::test_pending": {"n": 1}}}
    assert not (tmp_path / "out" / "stage1.rc").exists()


def test_an_oserror_while_preparing_the_kexec_is_still_one_line(tmp_path):
    done = _stage1_run(tmp_path, pending="{}", load_raises="OSError(2, 'no kernel image')")
    assert done.returncode == int(pytest.ExitCode.INTERNAL_ERROR), done.stdout
    assert textwrap.dedent("liveupdate.testing: cannot kexec: [Errno 2] no kernel image") in done.stdout
