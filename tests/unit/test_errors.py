"""errno -> exception mapping: one place, never losing the errno."""
from __future__ import annotations

import concurrent.futures
import errno
import importlib
import pickle
import subprocess
import sys

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


# -- errors travel: importable by their shown name, picklable -----------------

ALL_ERRNOS = sorted(errno.errorcode)


@pytest.mark.parametrize("err", ALL_ERRNOS)
def test_each_class_is_importable_by_the_name_its_traceback_shows(err):
    cls = errors.error_class(err)
    module = importlib.import_module(cls.__module__)
    assert getattr(module, cls.__qualname__) is cls
    assert cls.__module__ == "liveupdate.errors"


def _same_error(a: OSError, b: OSError) -> None:
    assert type(a) is type(b)
    assert (a.errno, a.strerror, str(a)) == (b.errno, b.strerror, str(b))
    assert (a.operation, a.arguments, a.detail) == (b.operation, b.arguments, b.detail)


@pytest.mark.parametrize("err", ALL_ERRNOS)
def test_every_error_survives_pickle(err):
    exc = errors.make(err, "preserve", "why it failed", session="cache", fd=5, token=2**64 - 1)
    _same_error(pickle.loads(pickle.dumps(exc)), exc)


def test_a_fresh_interpreter_unpickles_every_class():
    # A process that never built an error itself, as the parent of a
    # multiprocessing pool is: the classes must exist at import.
    sample = [errors.make(err, "retrieve", None, token=err) for err in ALL_ERRNOS]
    code = ("import pickle, sys\n"
            "for exc in pickle.loads(sys.stdin.buffer.read()):\n"
            "    print(type(exc).__module__, type(exc).__qualname__, exc.errno, exc.operation, exc.arguments)\n")
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(sample),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    expected = ["%s %s %d retrieve {'token': %d}" % (type(e).__module__, type(e).__qualname__, e.errno, e.errno)
                for e in sample]
    assert proc.stdout.decode().splitlines() == expected


def _worker_error(name: str) -> OSError:
    return errors.make(errno.EEXIST, "create_session", "a session of that name exists", name=name)


def _fail_in_worker(name: str) -> None:
    raise _worker_error(name)


def test_an_error_raised_in_a_worker_process_arrives_intact():
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_fail_in_worker, "cache")
        with pytest.raises(errors.FileExistsLiveUpdateError) as info:
            future.result(timeout=60)
    _same_error(info.value, _worker_error("cache"))


def test_the_special_classes_and_kernel_panic_survive_pickle():
    for exc in (errors.make(errno.EINVAL, "finish"), errors.make(errno.EBUSY, "open", path="/dev/liveupdate"),
                errors.make(errno.ESTALE, "retrieve", token=1)):
        _same_error(pickle.loads(pickle.dumps(exc)), exc)
    panic = pickle.loads(pickle.dumps(errors.KernelPanic("bad root")))
    assert type(panic) is errors.KernelPanic and str(panic) == "bad root"
