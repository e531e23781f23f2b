"""How the kernel reads and answers an extensible ioctl argument (luo_ucmd).

Every LUO argument struct starts with a u32 holding its size as the caller
knows it. The kernel reads that size, refuses a size below the last field
it needs (EINVAL), copies the struct into a buffer of its own size, zero
filling what an older caller did not send and refusing (E2BIG) non-zero
bytes beyond what it understands (``copy_struct_from_user``), and on success
copies back ``min(user size, its size)`` bytes.

Here the caller's memory is the ``bytes`` the port received: reading past
its end is EFAULT, where the real kernel would read whatever followed the
buffer in the caller's memory.
"""
from __future__ import annotations

import errno
import struct

__all__ = ["Ucmd", "get_user_size", "copy_struct_from_user"]

_U32 = struct.Struct("=I")


def get_user_size(arg: bytes) -> int:
    """get_user() of the leading u32. Raises OSError EFAULT if absent."""
    if len(arg) < 4:
        raise OSError(errno.EFAULT, "the argument is shorter than its size field")
    size: int = _U32.unpack_from(arg)[0]
    return size


def copy_struct_from_user(ksize: int, arg: bytes, usize: int) -> bytearray:
    """The kernel's view of the struct. Raises OSError E2BIG (non-zero bytes
    past ``ksize``) or EFAULT (``usize`` past the end of ``arg``)."""
    if usize > ksize:
        tail = arg[ksize:usize]
        if tail.count(0) != len(tail):
            raise OSError(errno.E2BIG, f"non-zero bytes beyond the {ksize} the kernel understands")
    if usize > len(arg):
        raise OSError(errno.EFAULT, f"size field says {usize} bytes, the argument has {len(arg)}")
    buf = bytearray(arg[: min(ksize, usize)])
    if len(buf) < ksize:
        buf.extend(bytes(ksize - len(buf)))
    return buf


class Ucmd:
    """One ioctl call: the caller's bytes, the size they declared, and the
    kernel's copy of the struct (``cmd``) that handlers read and fill."""

    __slots__ = ("arg", "user_size", "cmd")

    def __init__(self, arg: bytes, user_size: int, cmd: bytearray) -> None:
        self.arg = arg
        self.user_size = user_size
        self.cmd = cmd

    def respond(self, ksize: int) -> bytes:
        """luo_ucmd_respond(): the caller's bytes with the kernel's struct
        copied over their first ``min(user_size, ksize)`` bytes."""
        n = min(self.user_size, ksize)
        return bytes(self.cmd[:n]) + bytes(self.arg[n:])
