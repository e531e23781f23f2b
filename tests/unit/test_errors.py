"""errno -> exception mapping: one place, never losing the errno."""
from __future__ import annotations

import errno

import pytest

from liveupdate import errors

BUILTIN = [
    (errno.EEXIST, FileExistsError),
    (errno.ENOENT, FileNotFoundError),
    (errno.EPERM, PermissionError),
    (errno.EACCES, PermissionError),
    (errno.EINTR, InterruptedError),
    (errno.EAGAIN, BlockingIOError),
    (errno.EINVAL, ValueError),
]


@pytest.mark.parametrize("err,builtin", BUILTIN)
def test_builtin_subclasses_still_catch(err, builtin):
    exc = errors.make(err, "op")
    assert isinstance(exc, builtin)
    assert isinstance(exc, errors.LiveUpdateError)
    assert exc.errno == err


@pytest.mark.parametrize("err", sorted(errno.errorcode))
def test_every_errno_survives(err):
    exc = errors.make(err, "op", x=1)
    assert isinstance(exc, OSError) and exc.errno == err
    assert errno.errorcode[err] in str(exc)


def test_special_classes():
    assert isinstance(errors.make(errno.EBUSY, "open"), errors.BusyError)
    assert isinstance(errors.make(errno.ESTALE, "preserve"), errors.StaleHandleError)
    assert isinstance(errors.make(errno.EINVAL, "finish"), errors.InvalidArgumentError)


def test_message_names_operation_and_arguments():
    exc = errors.make(errno.EEXIST, "preserve", session="cache", fd=5, token=7)
    assert str(exc) == "[Errno 17] preserve(session='cache', fd=5, token=7): File exists (EEXIST)"
    assert exc.operation == "preserve"
    assert exc.arguments == {"session": "cache", "fd": 5, "token": 7}


def test_wrap_keeps_errno_and_backend_detail():
    raw = OSError(errno.ESTALE, "this handle belongs to a kernel replaced by kexec")
    exc = errors.wrap(raw, "retrieve", session="s", token=1)
    assert exc.errno == errno.ESTALE
    assert "replaced by kexec" in str(exc)
    assert "retrieve(session='s', token=1)" in str(exc)


def test_wrap_of_a_plain_errno_has_no_detail():
    exc = errors.wrap(OSError(errno.ENOTTY, "Inappropriate ioctl for device"), "create_session", name="x")
    assert exc.detail is None
    assert str(exc).endswith("(ENOTTY)")


def test_wrap_refuses_to_invent_an_errno():
    with pytest.raises(OSError) as info:
        errors.wrap(OSError("no errno"), "op")
    assert info.value.errno is None


def test_classes_are_cached():
    assert errors.error_class(errno.EEXIST) is errors.error_class(errno.EEXIST)
