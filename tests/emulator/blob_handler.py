"""A second file handler, for tests only: "testblob-v1".

It takes a small regular file that is not a memfd (a named file, at most
4000 bytes), keeps its bytes in one preserved page (length u64, data), and
in the next kernel hands back a new memfd holding them. It uses nothing but
the FileHandler contract, the KHO it is given and KernelFile: if a layer
of LUO, the port, the image or walk/inspect knew memfd by name, this
handler would not get through it.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from typing import Any, Dict, List, NamedTuple

from liveupdate.emulator import _host
from liveupdate.emulator.file_handler import FileHandler, Problem, register, unregister
from liveupdate.emulator.kfile import KernelFile

MAX = 4000
_LEN = struct.Struct("<Q")


class Blob(NamedTuple):
    pa: int
    token: int
    length: int
    head: bytes

    @property
    def inspect_key(self) -> str:
        return "blob"

    def inspect_fields(self) -> Dict[str, Any]:
        return {"pa": self.pa, "length": self.length, "head": self.head.hex()}

    def inspect_summary(self) -> str:
        return f"blob of {self.length} bytes starting {self.head[:8]!r}"


class BlobHandler(FileHandler):
    compatible = b"testblob-v1"

    def can_preserve(self, file: KernelFile) -> bool:
        st = file.st
        return stat.S_ISREG(st.st_mode) and st.st_nlink > 0 and st.st_size <= MAX

    def preserve(self, args: Any) -> None:
        data = os.pread(args.fd, MAX + 1, 0)
        if len(data) > MAX:
            raise OSError(errno.EFBIG, f"a blob is at most {MAX} bytes")
        pa = self.kho.alloc_preserve(_LEN.size + len(data) or 1)
        self.kho.memory.write(pa, _LEN.pack(len(data)) + data)
        args.serialized_data = pa

    def unpreserve(self, args: Any) -> None:
        self.kho.unpreserve_free(args.serialized_data)

    def retrieve(self, args: Any) -> None:
        memory = self.kho.memory
        (length,) = _LEN.unpack(memory.read(args.serialized_data, _LEN.size))
        if length > MAX:
            raise OSError(errno.EINVAL, f"blob record claims {length} bytes")
        data = memory.read(args.serialized_data + _LEN.size, length)
        fd = _host.kernel_fd(lambda: os.memfd_create("blob", os.MFD_CLOEXEC))
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        self.kho.restore_free(args.serialized_data)
        args.file = KernelFile.adopt(fd)

    def finish(self, args: Any) -> None:
        if not args.retrieve_status:
            self.kho.restore_free(args.serialized_data)

    @classmethod
    def walk(cls, memory: Any, pa: int, token: int, visited: Dict[int, str]) -> List[Any]:
        where = f"blob token {token}"
        if pa >> 12 in visited:
            return [Problem(where, f"record at {pa:#x} was decoded before")]
        visited[pa >> 12] = where
        (length,) = _LEN.unpack(memory.read(pa, _LEN.size))
        if length > MAX:
            return [Problem(where, f"claims {length} bytes, more than {MAX}")]
        return [Blob(pa, token, length, memory.read(pa + _LEN.size, min(length, 16)))]


def install() -> None:
    register(BlobHandler)


def remove() -> None:
    unregister(BlobHandler)
