"""liveupdate._timeout: the one reading of a timeout (the service client,
the CLI and the sd_notify path share it)."""
from __future__ import annotations

import errno
import math
import os
import socket
import threading

import pytest

from liveupdate import _timeout, systemd


def test_inf_has_no_deadline_and_polls_without_limit():
    assert _timeout.deadline_after(math.inf, "x") is None
    assert _timeout.poll_ms(None) == -1


def test_a_huge_finite_timeout_fits_one_poll():
    ms = _timeout.poll_ms(_timeout.deadline_after(1e300, "x"))
    assert 0 < ms <= 2**31 - 1


@pytest.mark.parametrize("value", [math.nan, -1, True, None, "1"])
def test_bad_timeouts_are_einval(value):
    with pytest.raises(OSError) as info:
        _timeout.seconds(value, "op")
    assert info.value.errno == errno.EINVAL


def test_argparse_type_refuses_nan():
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="'nan' is not a timeout"):
        _timeout.argument("nan")
    assert _timeout.argument("inf") == math.inf


def test_the_notify_path_uses_the_same_helper():
    import importlib

    notify = importlib.import_module("liveupdate.systemd.notify")
    assert notify.deadline_after is _timeout.deadline_after


def test_barrier_with_a_huge_finite_timeout_does_not_overflow(tmp_path):
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)

    def fake_systemd() -> None:
        _, anc, _, _ = listener.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in memoryview(data).cast("i"):
                    os.close(fd)

    thread = threading.Thread(target=fake_systemd)
    thread.start()
    try:
        assert systemd.barrier(timeout=1e300, environ={"NOTIFY_SOCKET": path}) is True
    finally:
        thread.join(30)
        listener.close()
