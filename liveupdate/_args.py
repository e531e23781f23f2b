"""Argument checks done before an ioctl (private).

Whatever the kernel would refuse with EINVAL is refused here with the same
errno and a message that says what is wrong, instead of a bare "Invalid
argument" from the kernel. Wrong *types* are TypeErrors, as in Python.
"""
from __future__ import annotations

import errno
from . import _abi, errors

TYPE_CHECKING = False  # typing is for annotations only (see errors.py)
if TYPE_CHECKING:
    from typing import Any, Union

    Name = Union[str, bytes]

_S32_MAX = 2**31 - 1


def name(value: Any, op: str) -> bytes:
    """The session name as the bytes the kernel gets: UTF-8 for a str,
    1 to 63 bytes, no NUL. Raises EINVAL (InvalidArgumentError) otherwise."""
    if isinstance(value, str):
        # surrogateescape: a name read back from the kernel that is not valid
        # UTF-8 (Session.name decodes it that way) encodes to the same bytes.
        raw = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        raise TypeError(f"{op}: a session name is str or bytes, not {type(value).__name__}")
    if not raw:
        raise errors.make(errno.EINVAL, op, "a session name cannot be empty", name=value)
    if len(raw) > _abi.NAME_MAX:
        raise errors.make(
            errno.EINVAL, op, f"the name is {len(raw)} bytes; at most {_abi.NAME_MAX} fit (64 with the NUL)", name=value
        )
    if b"\0" in raw:
        raise errors.make(errno.EINVAL, op, "a session name cannot contain a NUL byte", name=value)
    return raw


def token(value: Any, op: str) -> int:
    """A token is an int from 0 to 2**64-1 (EINVAL outside, TypeError if no int)."""
    if not isinstance(value, int):
        raise TypeError(f"{op}: a token is an int, not {type(value).__name__}")
    if not 0 <= value <= _abi.TOKEN_MAX:
        raise errors.make(errno.EINVAL, op, "a token is an unsigned 64-bit number (0 to 2**64-1)", token=value)
    return value


def fd(value: Any, op: str) -> int:
    """An fd: an int, or anything with ``fileno()`` (a file, socket, Session).

    The kernel's field is a signed 32-bit int: a number that cannot be an fd
    there is EBADF, as the kernel says of fds that are not open."""
    if not isinstance(value, int):
        fileno = getattr(value, "fileno", None)
        if fileno is None:
            raise TypeError(f"{op}: expected an fd (int) or an object with fileno(), not {type(value).__name__}")
        value = fileno()
        if not isinstance(value, int):
            raise TypeError(f"{op}: fileno() returned {type(value).__name__}, not int")
    if not -(2**31) <= value <= _S32_MAX:
        raise errors.make(errno.EBADF, op, "not a valid file descriptor number", fd=value)
    return value
