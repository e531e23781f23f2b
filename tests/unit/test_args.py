"""Arguments the kernel would refuse are refused before the ioctl, same errno."""
from __future__ import annotations

import errno
import io

import pytest

from liveupdate import _args, errors


@pytest.mark.parametrize("name,raw", [
    ("a", b"a"),
    ("x" * 63, b"x" * 63),
    (b"bytes-name", b"bytes-name"),
    ("ünïcødé", "ünïcødé".encode()),
    ("\udcff", b"\xff"),  # surrogate escapes round-trip non-UTF-8 names
])
def test_valid_names(name, raw):
    assert _args.name(name, "create_session") == raw


@pytest.mark.parametrize("name,why", [
    ("", "empty"),
    (b"", "empty"),
    ("x" * 64, "64 bytes"),
    ("é" * 32, "64 bytes"),
    ("a\0b", "NUL"),
])
def test_invalid_names_are_einval(name, why):
    with pytest.raises(errors.InvalidArgumentError) as info:
        _args.name(name, "create_session")
    exc = info.value
    assert exc.errno == errno.EINVAL
    assert isinstance(exc, ValueError) and isinstance(exc, OSError)
    assert why in str(exc)
    assert "create_session(name=" in str(exc)


@pytest.mark.parametrize("bad", [None, 5, ["a"]])
def test_name_types(bad):
    with pytest.raises(TypeError):
        _args.name(bad, "create_session")


@pytest.mark.parametrize("token", [0, 1, 2**63, 2**64 - 1])
def test_valid_tokens(token):
    assert _args.token(token, "preserve") == token


@pytest.mark.parametrize("token", [-1, 2**64, 2**100])
def test_tokens_out_of_range_are_einval(token):
    with pytest.raises(errors.InvalidArgumentError) as info:
        _args.token(token, "preserve")
    assert info.value.errno == errno.EINVAL
    assert f"token={token}" in str(info.value)


@pytest.mark.parametrize("bad", ["1", 1.0, None])
def test_token_types(bad):
    with pytest.raises(TypeError):
        _args.token(bad, "preserve")


def test_fd_from_objects_with_fileno(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        assert _args.fd(f, "preserve") == f.fileno()
    assert _args.fd(3, "preserve") == 3
    assert _args.fd(-1, "preserve") == -1  # the kernel answers EBADF itself


@pytest.mark.parametrize("bad", [2**31, -(2**31) - 1])
def test_fd_numbers_outside_s32_are_ebadf(bad):
    with pytest.raises(OSError) as info:
        _args.fd(bad, "preserve")
    assert info.value.errno == errno.EBADF


def test_fd_types():
    with pytest.raises(TypeError):
        _args.fd("3", "preserve")
    with pytest.raises(io.UnsupportedOperation):
        _args.fd(io.BytesIO(), "preserve")
