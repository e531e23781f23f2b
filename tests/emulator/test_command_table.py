"""A new ioctl is one row of the command table plus its handler.

Two test-only commands are registered here, at run time, exactly as a row
in ``liveupdate/_abi.py`` and a ``@*_OPS.handles`` function in the emulator
would add them, and nothing else is touched: the emulator dispatches them
with the kernel's argument rules, and the emulator service relays them
(the fd rule included) without knowing them.
"""
from __future__ import annotations

import errno
import os
import struct
import sys
from typing import Iterator, List

import pytest

import liveupdate
from liveupdate import _abi
from liveupdate.emulator import Emulator
from liveupdate.emulator.ioctl_op import DEVICE_OPS, SESSION_OPS
from liveupdate.emulator.ucmd import Ucmd
from liveupdate.service.testing import ServiceProcess

COUNT = struct.Struct("=II")  # size, count (out)
AGAIN = struct.Struct("=IiQ")  # size, fd (out), token

#: A device command: how many outgoing sessions there are.
COUNT_SESSIONS = _abi.Command("TEST_IOCTL_COUNT_SESSIONS", 0x02, "struct test_count", COUNT,
                              (("size", 0, 4), ("count", 4, 4)), "count", "device", (), None)
#: A session command returning a new fd: the file of a token, once more
#: (the retrieve-into-fd kind of command development kernels are adding).
RETRIEVE_AGAIN = _abi.Command("TEST_SESSION_RETRIEVE_AGAIN", 0x44, "struct test_again", AGAIN,
                              (("size", 0, 4), ("fd", 4, 4), ("token", 8, 8)), "token", "session",
                              ("incoming",), 4)


def _count_sessions(kernel, ucmd: Ucmd, fds) -> None:  # type: ignore[no-untyped-def]
    ucmd.cmd[:] = COUNT.pack(COUNT.unpack(ucmd.cmd)[0], kernel.sessions.outgoing.count)


def _retrieve_again(sessions, session, ucmd: Ucmd, fds) -> None:  # type: ignore[no-untyped-def]
    size, _fd, token = AGAIN.unpack(ucmd.cmd)
    newfd = fds.reserve_file_fd()
    try:
        file = sessions.retrieve_fd(session, token)
    except BaseException:
        fds.put_unused_fd(newfd)
        raise
    ucmd.cmd[:] = AGAIN.pack(size, newfd, token)
    fds.install_file(newfd, file)


@pytest.fixture
def new_commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(DEVICE_OPS.handlers, COUNT_SESSIONS.name, _count_sessions)
    monkeypatch.setitem(SESSION_OPS.handlers, RETRIEVE_AGAIN.name, _retrieve_again)
    _abi.register(COUNT_SESSIONS)
    _abi.register(RETRIEVE_AGAIN)
    try:
        yield
    finally:
        _abi.unregister(RETRIEVE_AGAIN)
        _abi.unregister(COUNT_SESSIONS)


def _errno(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno or 0


def _exercise(dev: liveupdate.Device, kexec) -> None:  # type: ignore[no-untyped-def]
    """Both new commands through ``dev``'s port, across a kexec."""
    port, ioctl = dev._port, dev._port.ioctl
    out = ioctl(dev.fileno(), COUNT_SESSIONS.number, COUNT.pack(COUNT.size, 0))
    assert COUNT.unpack(out) == (8, 0)
    session = dev.create_session("new-ioctl")
    memfd = os.memfd_create("data")
    os.write(memfd, b"kept")
    session.preserve(memfd, 7)
    out = ioctl(dev.fileno(), COUNT_SESSIONS.number, COUNT.pack(COUNT.size, 0))
    assert COUNT.unpack(out) == (8, 1)
    # The table's rules apply to the new rows as to the kernel's own:
    # RETRIEVE_AGAIN is for incoming sessions only, and takes 16 bytes.
    assert _errno(port.ioctl, session.fileno(), RETRIEVE_AGAIN.number, AGAIN.pack(16, -1, 7)) == errno.EINVAL
    os.close(memfd)
    dev.close()
    dev = kexec()
    session.close()  # a handle of the replaced kernel now
    incoming = dev.retrieve_session("new-ioctl")
    assert _errno(port.ioctl, incoming.fileno(), RETRIEVE_AGAIN.number, AGAIN.pack(15, -1, 7)[:15] + b"\0") \
        == errno.EINVAL
    first = incoming.retrieve(7)
    out = dev._port.ioctl(incoming.fileno(), RETRIEVE_AGAIN.number, AGAIN.pack(16, -1, 7))
    size, again, token = AGAIN.unpack(out)
    assert (size, token) == (16, 7) and again >= 0 and again != first
    try:
        assert os.pread(again, 4, 0) == b"kept"
        assert os.fstat(again).st_ino == os.fstat(first).st_ino
    finally:
        os.close(again)
        os.close(first)
    incoming.finish()
    incoming.close()
    dev.close()


def test_a_command_is_unknown_until_its_row_is_registered():
    emu = Emulator()
    with emu.open() as dev:
        # Beyond the device's table (0x00, 0x01): EINVAL, as the kernel says.
        assert _errno(dev._port.ioctl, dev.fileno(), COUNT_SESSIONS.number, COUNT.pack(8, 0)) == errno.EINVAL


def test_a_row_and_a_handler_are_all_a_new_ioctl_takes_in_the_emulator(new_commands: None):
    emu = Emulator()

    def kexec() -> liveupdate.Device:
        emu.kexec()
        return emu.open()

    _exercise(emu.open(), kexec)


def bind_for_good() -> None:
    """The two rows and handlers, for the life of a process (the service's)."""
    DEVICE_OPS.handlers[COUNT_SESSIONS.name] = _count_sessions
    SESSION_OPS.handlers[RETRIEVE_AGAIN.name] = _retrieve_again
    _abi.register(COUNT_SESSIONS)
    _abi.register(RETRIEVE_AGAIN)


class _ServiceWithNewCommands(ServiceProcess):
    """The service in its own process (so fds really cross), with the two
    rows registered before it starts: nothing of the service changes."""

    def command(self) -> List[str]:
        script = ("import sys; from tests.emulator.test_command_table import bind_for_good; bind_for_good(); "
                  "from liveupdate.service.__main__ import main; sys.exit(main(sys.argv[1:]))")
        return [sys.executable, "-c", script, "serve", "--socket", self.socket] + self.extra_args


def test_the_service_relays_a_new_ioctl_and_its_fd_from_the_table_alone(new_commands: None, tmp_path):
    from liveupdate.service import client

    service = _ServiceWithNewCommands(tmp_path)
    env_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    service.env["PYTHONPATH"] = env_root
    service.start()
    try:
        def kexec() -> liveupdate.Device:
            client.kexec(service.socket)
            return liveupdate.open(emulator=service.socket)

        _exercise(liveupdate.open(emulator=service.socket), kexec)
    finally:
        assert service.stop() == 0, service.log()


def test_a_row_without_a_handler_fails_loudly(monkeypatch: pytest.MonkeyPatch):
    _abi.register(COUNT_SESSIONS)
    try:
        emu = Emulator()
        with emu.open() as dev:
            with pytest.raises(RuntimeError, match="no handler for TEST_IOCTL_COUNT_SESSIONS"):
                dev._port.ioctl(dev.fileno(), COUNT_SESSIONS.number, COUNT.pack(8, 0))
    finally:
        _abi.unregister(COUNT_SESSIONS)


def test_every_row_of_the_table_has_an_emulator_handler():
    for table in (DEVICE_OPS, SESSION_OPS):
        assert [row for row in table.ops() if row is not None]  # builds, so none is missing
    names = {row.name for row in _abi.COMMAND_TABLE}
    assert names == set(DEVICE_OPS.handlers) | set(SESSION_OPS.handlers)


def test_register_refuses_a_taken_number():
    clash = _abi.Command("TEST_CLASH", 0x40, "struct x", AGAIN, (("size", 0, 4), ("fd", 4, 4), ("token", 8, 8)),
                         "token", "session", ("outgoing",), None)
    with pytest.raises(ValueError, match="in the table already"):
        _abi.register(clash)
