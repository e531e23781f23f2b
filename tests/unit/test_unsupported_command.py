"""A kernel without a command the library calls: one clear error, naming
the command, keeping the kernel's errno (errors.wrap_ioctl)."""
from __future__ import annotations

import errno
import os

import pytest

import liveupdate
from liveupdate import _abi
from liveupdate.session import Session


class OldKernel:
    """A port whose kernel answers every ioctl with one errno."""

    kind = "device"

    def __init__(self, err: int) -> None:
        self.err = err

    def open_device(self, path: str) -> int:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def ioctl(self, fd: int, cmd: int, arg: bytes) -> bytes:
        raise OSError(self.err, os.strerror(self.err))

    close = staticmethod(os.close)


def _session(err: int) -> Session:
    return Session._adopt(OldKernel(err), os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), "incoming", b"s")


@pytest.mark.parametrize("call", ["finish", "name", "retrieve"])
def test_enotty_says_which_command_this_kernel_lacks(call):
    with _session(errno.ENOTTY) as session, pytest.raises(liveupdate.LiveUpdateError) as info:
        if call == "retrieve":
            session.retrieve(1)
        elif call == "finish":
            session.finish()
        else:
            session.name
    assert info.value.errno == errno.ENOTTY
    assert "this kernel does not support LIVEUPDATE_SESSION_" in str(info.value)


def test_einval_from_get_name_can_only_mean_no_such_command():
    with _session(errno.EINVAL) as session, pytest.raises(liveupdate.InvalidArgumentError) as info:
        session.name
    assert info.value.errno == errno.EINVAL
    assert "this kernel does not support LIVEUPDATE_SESSION_GET_NAME (ioctl 0xba43)" in str(info.value)


def test_einval_that_has_another_meaning_is_not_called_unsupported():
    # FINISH on an outgoing session is EINVAL on every kernel.
    with _session(errno.EINVAL) as session, pytest.raises(liveupdate.InvalidArgumentError) as info:
        session.finish()
    assert "does not support" not in str(info.value)


def test_a_command_beyond_the_table_of_the_emulated_kernel_is_reported_so(monkeypatch):
    # A newer library on an older kernel: the library's table has a row
    # (unknown_if_einval) that the emulated kernel's table lacks, so the
    # kernel answers EINVAL, a number beyond its table.
    row = _abi.Command("TEST_SESSION_NEWER", 0x50, "struct t", _abi.FINISH, (("size", 0, 4), ("reserved", 4, 4)),
                       "reserved", "session", ("outgoing", "incoming"), None, unknown_if_einval=True)
    monkeypatch.setitem(_abi.BY_NUMBER, row.number, row)  # the library's table only, not the emulator's
    emu = liveupdate.Emulator()
    with emu.open() as dev, dev.create_session("s") as session:
        with pytest.raises(liveupdate.InvalidArgumentError) as info:
            session._call(row.number, _abi.FINISH.pack(8, 0), "newer")
    assert "this kernel does not support TEST_SESSION_NEWER (ioctl 0xba50)" in str(info.value)
