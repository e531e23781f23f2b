"""Making and reading memfds the way the kernel selftests do."""
from __future__ import annotations

import mmap
import os
import resource

PAGE = mmap.PAGESIZE


def memfd_with(data: bytes, name: str = "kexec-test", flags: int = 0, size: int = PAGE) -> int:
    """A memfd of ``size`` bytes starting with ``data`` (written through a
    shared mapping, as create_and_preserve_memfd() does). The caller closes it."""
    fd = os.memfd_create(name, flags)
    try:
        os.ftruncate(fd, size)
        if data:
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_WRITE) as m:
                m[: len(data)] = data
    except BaseException:
        os.close(fd)
        raise
    return fd


def preserve_new_memfd(session, token: int, data: bytes, **kwargs) -> None:
    """Preserve a fresh memfd holding ``data`` and close our fd of it: from
    then on only the session keeps the file."""
    fd = memfd_with(data, **kwargs)
    try:
        session.preserve(fd, token)
    finally:
        os.close(fd)


def text_at_start(fd: int, limit: int = PAGE) -> bytes:
    """The NUL-terminated string at offset 0 (what the selftests compare)."""
    return os.pread(fd, limit, 0).split(b"\0", 1)[0]


def ensure_nofile(count: int) -> None:
    """Let this process hold ``count`` more fds (as luo_ensure_nofile_limit())."""
    want = count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        hard = want  # raising the hard limit needs CAP_SYS_RESOURCE; root has it
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
