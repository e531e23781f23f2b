"""Test cases for checking the ``liveupdate.testing`` plugin itself.

Not collected here (the file name does not start with ``test_``): the
plugin's own tests copy it to a scratch directory as ``test_cases.py`` and
run it in a separate pytest, on the emulator (tests/kexec/test_plugin.py)
and across a real kexec in the VM (tests/vm/test_guest_kexec.py). Some of
these fail on purpose; the expected outcomes are listed below.
"""
import errno
import os
import xml.etree.ElementTree as ET

import pytest

# name: (emulator, VM stage 1, VM stage 2); None = deselected
EXPECTED = {
    "test_passes_both": ("passed", "passed", "passed"),
    "test_fails_before": ("failed", "failed", "skipped"),
    "test_fails_after": ("failed", "passed", "failed"),
    "test_dropped_session_does_not_cross": ("passed", "passed", "passed"),
    "test_kexec_only_once": ("passed", "passed", "passed"),
    "test_without_the_fixture": ("passed", "passed", None),
    "test_unkept_session_does_not_cross": ("passed", "passed", "passed"),
    "test_state_crosses_as_json": ("passed", "passed", "passed"),
    "test_state_json_cannot_carry_fails_at_kexec": ("failed", "failed", "skipped"),
    "test_keep_refuses_what_it_cannot_close": ("passed", "passed", "skipped"),
    "test_cleanup_goes_past_a_failing_close": ("failed", "passed", "skipped"),
    "test_the_session_after_the_failing_close_was_closed": ("passed", "skipped", None),
}


def junit_outcomes(path):
    """{test name: "passed" | "failed" | "skipped"} from a junit xml file."""
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            result[case.get("name")] = "failed"
        elif case.find("skipped") is not None:
            result[case.get("name")] = "skipped"
        else:
            result[case.get("name")] = "passed"
    return result


def test_passes_both(liveupdate_kexec):
    lk = liveupdate_kexec
    if lk.stage == 1:
        session = lk.keep(lk.open().create_session("plugin-ok"))
        memfd = os.memfd_create("plugin-ok")
        lk.keep(memfd)
        os.write(memfd, b"kept")
        session.preserve(memfd, 7)
        lk.state["answer"] = 42
        lk.kexec()
    assert lk.state == {"answer": 42}
    session = lk.open().retrieve_session("plugin-ok")
    fd = session.retrieve(7)
    assert os.pread(fd, 10, 0) == b"kept"
    os.close(fd)
    session.finish()
    session.close()


def test_fails_before(liveupdate_kexec):
    assert liveupdate_kexec.stage == 2, "deliberate stage-1 failure"


def test_fails_after(liveupdate_kexec):
    lk = liveupdate_kexec
    if lk.stage == 1:
        lk.keep(lk.open().create_session("plugin-after"))
        lk.kexec()
    session = lk.open().retrieve_session("plugin-after")
    session.finish()
    session.close()
    assert False, "deliberate stage-2 failure"


def test_dropped_session_does_not_cross(liveupdate_kexec):
    lk = liveupdate_kexec
    if lk.stage == 1:
        lk.open().create_session("plugin-dropped").close()
        lk.kexec()
    _did_not_cross(lk, "plugin-dropped")


def _did_not_cross(lk, name):
    with pytest.raises(OSError) as info:
        lk.open().retrieve_session(name)
    assert info.value.errno == errno.ENOENT


def test_kexec_only_once(liveupdate_kexec):
    lk = liveupdate_kexec
    if lk.stage == 1:
        lk.kexec()
    with pytest.raises(OSError) as info:
        lk.kexec()
    assert info.value.errno == errno.EINVAL


def test_without_the_fixture():
    assert os.environ.get("LIVEUPDATE_STAGE", "1") == "1"


def test_unkept_session_does_not_cross(liveupdate_kexec):
    # Still referenced, preserving a file, but not kept: a real kexec ends
    # stage 1's process, so it is gone, and the emulator agrees.
    lk = liveupdate_kexec
    if lk.stage == 1:
        session = lk.open().create_session("plugin-unkept")
        memfd = lk.keep(os.memfd_create("plugin-unkept"))
        session.preserve(memfd, 1)
        lk.kexec()
    _did_not_cross(lk, "plugin-unkept")


def test_state_crosses_as_json(liveupdate_kexec):
    lk = liveupdate_kexec
    if lk.stage == 1:
        lk.state.update({"pair": (1, 2), 3: "three", "nested": {"ok": [True, None, 1.5]}})
        lk.kexec()
    assert lk.state == {"pair": [1, 2], "3": "three", "nested": {"ok": [True, None, 1.5]}}


def test_state_json_cannot_carry_fails_at_kexec(liveupdate_kexec):
    lk = liveupdate_kexec
    lk.state["handle"] = object()
    lk.kexec()
    raise AssertionError("kexec() let a state through that JSON cannot carry")


class _CloseRaises:
    def close(self):
        raise RuntimeError("deliberate close failure")


_kept_after_the_failing_close = []


def test_keep_refuses_what_it_cannot_close(liveupdate_kexec):
    with pytest.raises(TypeError) as info:
        liveupdate_kexec.keep(object())
    assert "lk.keep() keeps a session, an fd (an int) or an object with close(), not <object object" in str(info.value)


def test_cleanup_goes_past_a_failing_close(liveupdate_kexec):
    # On the emulator the kept objects are closed at the end of the test:
    # the RuntimeError fails it (once), and the session after it is still
    # closed. On a real kernel they are held until the kexec.
    lk = liveupdate_kexec
    lk.keep(_CloseRaises())
    _kept_after_the_failing_close.append(lk.keep(lk.open().create_session("plugin-bad-close")))


def test_the_session_after_the_failing_close_was_closed():
    if os.environ.get("LIVEUPDATE_STAGE"):
        pytest.skip("on a real kernel kept objects stay open until the kexec")
    assert [s.closed for s in _kept_after_the_failing_close] == [True]
