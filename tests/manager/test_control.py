"""`liveupdate emulator kexec` doing systemd's part: an emulated systemd in
another process of the same emulator service is asked, over its control
socket, to prepare before the kexec and to finish after it."""
from __future__ import annotations

import os
import socket
import sys

import pytest

from liveupdate.emulator.systemd import EmulatedSystemd
from liveupdate.emulator.systemd.control import ControlServer, kexec_with_managers, registry
from liveupdate.service import client as service_client
from liveupdate.service import testing as service_testing

HERE = os.path.dirname(os.path.abspath(__file__))
UNIT = f"""\
[Service]
Type=notify
ExecStart={sys.executable} {os.path.join(HERE, "sample_daemon.py")}
FileDescriptorStoreMax=4
FileDescriptorStorePreserve=yes
[Install]
WantedBy=multi-user.target
"""


@pytest.fixture
def service(tmp_path):
    (tmp_path / "svc").mkdir()
    with service_testing.running_service(tmp_path / "svc") as path:
        yield path


def test_one_kexec_command_does_systemds_part(service, tmp_path) -> None:
    repo = os.path.dirname(os.path.dirname(HERE))
    env = dict(os.environ, PYTHONPATH=repo)
    with EmulatedSystemd(socket=service, directory=str(tmp_path / "m"), env=env) as manager:
        manager.load(UNIT, name="d.service")
        manager.start("d.service")
        control = ControlServer(manager, service)
        try:
            said = []
            kexec_with_managers(service, lambda: service_client.kexec(service), said.append)
            assert len(said) == 2 and "KExecCount=1" in said[1]
            # "sess" is newest: the daemon carried its session into a new one.
            assert [n for n, _ in manager.fd_store("d.service")] == ["sess", "data"]
            assert '"session": "kept in my session"' in manager.log("d.service").splitlines()[-1]
        finally:
            control.close()
    assert os.listdir(registry(service)) == []


def test_a_stale_control_socket_is_skipped_and_removed(service) -> None:
    directory = registry(service)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    stale = os.path.join(directory, "999999.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(stale)
    sock.close()  # bound, never listening: a manager that died
    assert kexec_with_managers(service, lambda: "done") == "done"
    assert not os.path.exists(stale)


def test_the_control_directory_must_not_be_open_to_others(service) -> None:
    directory = registry(service)
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o777)
    with pytest.raises(PermissionError, match="open to others"):
        ControlServer(object(), service)
