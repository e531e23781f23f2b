"""The liveupdate_systemd fixture end to end: a daemon under the emulated
manager stores a memfd and a session, survives emulated kexecs and gets
both back, and the fixture is as strict as the real thing."""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Dict, List

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
UNIT = """\
[Unit]
Description=a daemon under test

[Service]
Type=notify
ExecStart=/usr/bin/false
FileDescriptorStoreMax=4
FileDescriptorStorePreserve=yes

[Install]
WantedBy=multi-user.target
"""


def reports(sd: Any) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in sd.log("d.service").splitlines() if line.startswith("{")]


@pytest.fixture
def sd(liveupdate_systemd: Any) -> Any:
    repo = os.path.dirname(os.path.dirname(HERE))
    liveupdate_systemd.env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    liveupdate_systemd.unit(UNIT, name="d.service", command=[sys.executable, os.path.join(HERE, "sample_daemon.py")])
    return liveupdate_systemd


def test_a_daemon_keeps_its_memfd_and_its_session(sd: Any) -> None:
    if sd.stage == 1:
        sd.start("d.service")
        sd.restart("d.service")
        first, restarted = reports(sd)
        assert first["listen"] == [] and first["env"]["FDSTORE"] == "4"
        assert restarted["listen"] == ["sess", "data"]  # newest first
        assert restarted["data"] == "kept by the fd store"
        assert restarted["session"] == "outgoing: daemon-sess"
        sd.state["restarts"] = 1
        report = sd.kexec()
        assert report["lost"] == [] and report["kexecs"] == 1
        assert report["mapping"]["units"]["d.service"]["fdstore"] == [
            {"type": "luo_session", "name": "sess", "sessionName": "daemon-sess"},
            {"type": "fd", "name": "data", "token": 1}]
    assert sd.stage == 2 and sd.state == {"restarts": 1}
    after = reports(sd)[-1]
    # The order turned around at the kexec, as systemd's does.
    assert after["listen"] == ["data", "sess"]
    assert after["data"] == "kept by the fd store"
    assert after["session"] == "kept in my session"  # and carried on
    report = sd.kexec()
    last = reports(sd)[-1]
    assert (last["data"], last["session"]) == ("kept by the fd store", "kept in my session")
    assert [v for v in (e.survives for e in sd.check("d.service").entries)] == [True, True]


def test_state_must_survive_json(sd: Any) -> None:
    sd.state["x"] = object()
    with pytest.raises(OSError) as info:
        sd.kexec()
    assert info.value.errno == errno.EINVAL and "JSON" in str(info.value)


def test_a_unit_key_it_does_not_play_is_refused(liveupdate_systemd: Any) -> None:
    with pytest.raises(OSError, match=r"Restart= is not played"):
        liveupdate_systemd.unit(UNIT.replace("[Install]", "Restart=always\n[Install]"), name="x.service")


def test_a_service_that_dies_before_ready_fails_its_start(liveupdate_systemd: Any) -> None:
    liveupdate_systemd.unit(UNIT, name="dies.service", command=["/bin/sh", "-c", "echo no; exit 3"])
    with pytest.raises(OSError) as info:
        liveupdate_systemd.start("dies.service")
    assert info.value.errno == errno.ECHILD and "exited with 3" in str(info.value)
    assert liveupdate_systemd.log("dies.service") == "no\n"
