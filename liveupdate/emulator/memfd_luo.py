"""The memfd file handler, compatible "memfd-v2" (mm/memfd_luo.c).

Which files: a regular file of tmpfs/shmem with no name in any directory
(``i_nlink == 0``): memfds, and O_TMPFILE files on a tmpfs, as in the kernel.
A hugetlb memfd is not shmem, so no handler takes it: preserve fails with
ENOENT, as on the kernel. A file is identified by its inode (``get_id``), so
any fd and any re-open of the same memfd is the same file.

Preserve records, in a preserved ``memfd_luo_ser`` (48 bytes): the position,
the size, the seals (EOPNOTSUPP for a seal this version does not know) and
the folios, every page of the file including holes (EFBIG when the file has
more than 2**32-1 pages). The folio array (16 bytes a page: pfn | flags<<52,
index) lives in a preserved vmalloc area described by a ``kho_vmalloc``.
Freeze (at reboot) updates the position only. Retrieve builds a new memfd
(``memfd:`` with sealing allowed) with the recorded seals, size, position and
pages, and returns it; its fds are close-on-exec. Finish of a file never
retrieved gives its pages back.

What user space cannot enforce: while a memfd is preserved the kernel
freezes its size (``ftruncate``/``fallocate`` fail with EPERM) and, as its
pages are pinned, refuses to add F_SEAL_WRITE (EBUSY). The emulator cannot
make a host syscall fail, so it records size and seals at preserve like the
kernel, hands those over, and warns (``RuntimeWarning``) at the kexec if the
file was resized or write-sealed meanwhile; pages cut off by such a shrink
read as zeros.
Holes are not allocated in the host file (their pages read as zeros either
way).

In-process kexec, no copy: the preserved folios are the memfd's own pages
(:class:`.kho.FolioPage`). When every folio of a record is still the
original memfd's page at the same index, its size and seals are unchanged
and its inode is not in use by a session of the new kernel, retrieve hands
back a new open of that same inode (through ``/proc/self/fd``) positioned
at the recorded offset: the memory is the same, nothing is copied. This
path is taken only when the result looks like the kernel's new memfd (mode
0777, same seals, size); what still differs: the name in /proc (the
original ``/memfd:NAME (deleted)``; the kernel names its new file with an
empty name, ``/ (deleted)``, which memfd_create() cannot make, so the
emulator's fresh memfds show ``/memfd: (deleted)``), and an fd of
the old memfd that the process still has open aliases the retrieved file
(a real kexec leaves no such fd). Otherwise, e.g. after booting from an
image, or for a memfd made with MFD_NOEXEC_SEAL (mode 0666, which the
kernel's new memfd does not keep), the pages are written into a fresh memfd
made as the kernel makes it (0777; adding F_SEAL_EXEC to it then implies
the write seals, as in the kernel).
"""
from __future__ import annotations

import bisect
import errno
import fcntl
import os
import stat
import warnings
from typing import Any, Container, Dict, List, NamedTuple, Optional, Tuple

from . import _host, abi, file_handler
from .file_handler import Problem
from .folio_runs import ENTRIES_PER_PAGE, FolioTable, Run, table_runs
from .kfile import KernelFile
from .kho import KHO, PAGE_SHIFT, PAGE_SIZE, Backing, PhysicalMemory

__all__ = ["MemfdHandler", "Memfd", "seal_names"]

_FOLIO_FLAGS = abi.MEMFD_LUO_FOLIO_DIRTY | abi.MEMFD_LUO_FOLIO_UPTODATE
_MAX_FOLIOS = 0xFFFFFFFF  # memfd_pin_folios() counts folios in an unsigned int


class Memfd(NamedTuple):
    """What :func:`liveupdate.emulator.walk` shows for a memfd-v2 file: its
    ``memfd_luo_ser`` at ``pa`` and its folio array (a FolioTable, equal to
    the tuple of (pfn, flags, index) entries)."""

    pa: int
    token: int
    pos: int
    size: int
    seals: int
    flags: int
    nr_folios: int
    folios: "FolioTable | Tuple[Tuple[int, int, int], ...]"  # (pfn, flags, index)

    @property
    def inspect_key(self) -> str:
        """Where ``liveupdate inspect`` shows it (see file_handler)."""
        return "memfd"

    def inspect_fields(self) -> Dict[str, int]:
        return {"pa": self.pa, "size": self.size, "pos": self.pos, "seals": self.seals, "flags": self.flags,
                "folios": self.nr_folios}

    def inspect_summary(self) -> str:
        return (f"memfd of {self.size} bytes, position {self.pos}, seals {seal_names(self.seals)}, "
                f"{self.nr_folios} folio(s)")


_SEALS = ((0x1, "seal"), (0x2, "shrink"), (0x4, "grow"), (0x8, "write"), (0x10, "future-write"), (0x20, "exec"))


def seal_names(seals: int) -> str:
    """F_SEAL_* bits as words: 0x5 -> "seal,grow"."""
    names = [name for bit, name in _SEALS if seals & bit]
    unknown = seals & ~sum(bit for bit, _ in _SEALS)
    if unknown:
        names.append(f"{unknown:#x}")
    return ",".join(names) or "none"


class _Private:
    """What preserve keeps for unpreserve (the kernel keeps the vmalloc
    pointer): the area's pages, the folios' pfns, the size at preserve."""

    __slots__ = ("area", "first_pfn", "npages", "size", "seals")

    def __init__(self, area: List[int], first_pfn: int, npages: int, size: int, seals: int) -> None:
        self.area = area
        self.first_pfn = first_pfn
        self.npages = npages
        self.size = size
        self.seals = seals


@file_handler.register
class MemfdHandler(file_handler.FileHandler):
    """liveupdate_file_handler for memfds, bound to one kernel's KHO."""

    compatible = abi.MEMFD_LUO_FH_COMPATIBLE

    def __init__(self, kho: KHO, in_use: Optional[Container[Any]] = None) -> None:
        # in_use: the kernel's index of files held by sessions
        # (luo_preserved_files): the no-copy retrieve must not hand out an
        # inode already held.
        super().__init__(kho, in_use if in_use is not None else ())

    @classmethod
    def walk(cls, memory: PhysicalMemory, pa: int, token: int, visited: Dict[int, str]) -> List[Any]:
        return _walk(memory, pa, token, visited)

    # -- identity -------------------------------------------------------------
    def can_preserve(self, file: KernelFile) -> bool:
        st = file.st
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
            return False
        return file.fs_magic == _host.TMPFS_MAGIC

    def get_id(self, file: KernelFile) -> Tuple[int, int]:
        return file.ident

    # -- before the kexec -----------------------------------------------------
    def preserve(self, args: Any) -> None:
        """Raises OSError: EOPNOTSUPP (unknown seals), EFBIG (more than
        2**32-1 pages), ENOMEM (more pages than this machine could pin)."""
        # The caller's fd is valid for the whole preserve call.
        kho, memory, fd = self.kho, self.kho.memory, args.fd
        ser_pa = kho.alloc_preserve(abi.MEMFD_SER.size)
        try:
            seals = _host_seals(fd)
            if seals & ~abi.MEMFD_LUO_ALL_SEALS:
                raise OSError(errno.EOPNOTSUPP, f"the memfd has seals {seals:#x} that memfd-v2 cannot preserve")
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            st = os.fstat(fd)
            size = st.st_size
            npages = -(-size // PAGE_SIZE)
            if npages > _MAX_FOLIOS:
                raise OSError(errno.EFBIG, f"the memfd has {npages} pages; at most {_MAX_FOLIOS} can be preserved")
            pinned = kho.pinned_pages()
            if npages and pinned + npages > _host_pages():
                # The kernel pins a page for every index, holes included,
                # and fails when it cannot allocate them: so does the
                # emulator, counting the pages it already holds pinned.
                raise OSError(errno.ENOMEM, f"the memfd has {npages} pages; with the {pinned} already pinned "
                                            f"that is more than this machine's {_host_pages()} pages of RAM")
        except BaseException:
            kho.unpreserve_free(ser_pa)
            raise
        desc = bytes(abi.KHO_VMALLOC.size)
        private = _Private([], 0, 0, size, seals)
        if npages:
            backing = Backing(args.file, (st.st_dev, st.st_ino))
            first = kho.preserve_folios(backing, npages)
            # The folio array (16 bytes a page) as runs: no step per page.
            area = kho.vmalloc_folio_table(first, _FOLIO_FLAGS, npages)
            desc = kho.preserve_vmalloc(area)
            private = _Private(area, first, npages, size, seals)
        memory.write(ser_pa, abi.MEMFD_SER.pack(pos, size, seals, 0, npages, desc))
        args.serialized_data = ser_pa
        args.private_data = private

    def freeze(self, args: Any) -> None:
        """Record the position as it is now (the only field that may change)."""
        if not args.serialized_data:
            raise OSError(errno.EINVAL, "memfd record missing")
        file = args.file
        self.kho.memory.write_u64(args.serialized_data, file.position())
        private: _Private = args.private_data
        if file.fd < 0 or private is None:
            return
        size = os.fstat(file.fd).st_size
        if size != private.size:
            warnings.warn(
                f"memfd of token {args.token} changed size from {private.size} to {size} bytes while preserved; "
                f"the kernel refuses that (EPERM) and hands over {private.size} bytes",
                RuntimeWarning,
                stacklevel=2,
            )
        if _host_seals(file.fd) & ~private.seals & abi.F_SEAL_WRITE:
            warnings.warn(
                f"F_SEAL_WRITE was added to the memfd of token {args.token} while preserved; the kernel refuses "
                f"that (EBUSY: its pages are pinned) and hands over the seals it had at preserve",
                RuntimeWarning,
                stacklevel=2,
            )

    def unpreserve(self, args: Any) -> None:
        if not args.serialized_data:
            return
        kho = self.kho
        raw = kho.memory.read(args.serialized_data, abi.MEMFD_SER.size)
        desc = abi.MEMFD_SER.unpack(raw)[5]
        private: _Private = args.private_data
        if private.npages:
            kho.unpreserve_vmalloc(desc)
            kho.unpreserve_folios(private.first_pfn)
            kho.vfree(private.area)
        kho.unpreserve_free(args.serialized_data)

    # -- after the kexec --------------------------------------------------------
    def _folio_runs(self, nr_folios: int, desc: bytes) -> Optional[Tuple[List[Run], List[int]]]:
        """The folio array of a record as runs, and its area's pfns (to
        vfree); None when the array cannot be restored."""
        restored = self.kho.restore_vmalloc(desc)
        if restored is None:
            return None
        pages, area = restored
        # The kernel trusts nr_folios; entries past the area would be out
        # of bounds there. Here they do not exist.
        count = min(nr_folios, len(pages) * ENTRIES_PER_PAGE)
        return table_runs(pages, count), area

    def retrieve(self, args: Any) -> None:
        """Raises OSError: EINVAL (no record, bad folio array), EOPNOTSUPP
        (unknown seals), EIO (a folio that was not handed over), EEXIST (two
        folios at one index), EFBIG (a size or position the host cannot
        represent), or the host's errno creating the memfd."""
        kho = self.kho
        ser_pa = args.serialized_data
        if not ser_pa:
            raise OSError(errno.EINVAL, "memfd record missing")
        try:
            pos, size, seals, _flags, nr_folios, desc = abi.MEMFD_SER.unpack(kho.memory.read(ser_pa, abi.MEMFD_SER.size))
            if seals & ~abi.MEMFD_LUO_ALL_SEALS:
                raise OSError(errno.EOPNOTSUPP, f"the record has seals {seals:#x} unknown to memfd-v2")
            runs: List[Run] = []
            area: List[int] = []
            if nr_folios:
                decoded = self._folio_runs(nr_folios, desc)
                if decoded is None:
                    raise OSError(errno.EINVAL, "the memfd's folio array cannot be restored")
                runs, area = decoded
            try:
                file = self._reuse(runs, pos, size, seals)
                if file is None:
                    file = self._build(runs, pos, size, seals)
            finally:
                kho.vfree(area)
            args.file = file
        finally:
            kho.restore_free(ser_pa)

    def _reuse(self, runs: List[Run], pos: int, size: int, seals: int) -> Optional[KernelFile]:
        """The no-copy path: reopen the memfd whose own pages these are."""
        npages = -(-size // PAGE_SIZE)
        if not runs or pos > _host.MAX_LFS_FILESIZE or sum(run[3] for run in runs) != npages:
            return None
        kho = self.kho
        backing: Optional[Backing] = None
        expect = 0
        for pfn, flags, index, count in runs:
            if index != expect or not pfn or not flags & abi.MEMFD_LUO_FOLIO_UPTODATE:
                return None
            run = kho.incoming_folios.find(pfn)
            if run is None or pfn + count > run.end:
                return None
            off = pfn - run.pfn
            if run.index + off != index or run.live.find(0, off, off + count) >= 0:
                return None
            if kho.claimed and any(p in kho.claimed for p in range(pfn, pfn + count)):
                return None
            if backing is None:
                backing = run.backing
            elif run.backing is not backing:
                return None
            expect += count
        assert backing is not None
        if not backing.reusable or backing.ino in self.in_use:
            return None
        kept = backing.file
        try:
            if kept.fd >= 0:
                path = f"/proc/self/fd/{kept.fd}"
                newfd = _host.kernel_fd(lambda: os.open(path, os.O_RDWR | os.O_CLOEXEC))
            else:
                newfd = kept.borrow()  # a mapped reference reopens as a new open file
        except OSError:
            return None
        try:
            st = os.fstat(newfd)
            # Only where the kernel's new memfd would look the same: its
            # mode is 0777 (so adding F_SEAL_EXEC there implies the write
            # seals, which an inode with that mode already carries).
            if st.st_size != size or _host_seals(newfd) != seals or st.st_mode & 0o7777 != 0o777:
                os.close(newfd)
                return None
            os.lseek(newfd, pos, os.SEEK_SET)
            file = KernelFile.adopt(newfd)
        except OSError:
            os.close(newfd)
            return None
        for pfn, _flags, _index, count in runs:
            kho.restore_folios(pfn, count)
        return file

    def _build(self, runs: List[Run], pos: int, size: int, seals: int) -> KernelFile:
        """The general path: a new memfd filled from the restored pages,
        run by run (holes and zero pages of the source are not written)."""
        kho = self.kho
        fd = _host.kernel_fd(_new_memfd)
        try:
            if size > _host.MAX_LFS_FILESIZE:
                raise OSError(errno.EFBIG, f"size {size} cannot be represented by the host")
            os.ftruncate(fd, size)
            seen = _Indexes()
            for k, (pfn, flags, index, count) in enumerate(runs):
                if not pfn:
                    continue
                done, segments = kho.restore_folios(pfn, count)
                dup = seen.first_in(index, done)
                if dup is not None:
                    # As the kernel: the page restored, then found taken.
                    self._put_rest(runs, k, done)
                    raise OSError(errno.EEXIST, f"two folios for page {dup}")
                if done < count:
                    self._put_rest(runs, k, done + 1)
                    raise OSError(errno.EIO, f"folio at {(pfn + done) << PAGE_SHIFT:#x} was not preserved")
                seen.add(index, count)
                if flags & abi.MEMFD_LUO_FOLIO_UPTODATE:
                    _fill(fd, index, segments, size)
            if pos <= _host.MAX_LFS_FILESIZE:
                os.lseek(fd, pos, os.SEEK_SET)
            if seals:
                fcntl.fcntl(fd, _host.F_ADD_SEALS, seals)
        except BaseException:
            os.close(fd)
            raise
        return KernelFile.adopt(fd)

    def _put_rest(self, runs: List[Run], k: int, skip: int) -> None:
        """Restore (give back) every folio after the first ``skip`` entries
        of run ``k``, ignoring those that cannot be: an unwind."""
        for pfn, _flags, _index, count in runs[k:]:
            if pfn:
                _restore_all(self.kho, pfn + skip, count - skip)
            skip = 0

    def finish(self, args: Any) -> None:
        """Give back the pages of a file never retrieved."""
        if args.retrieve_status or not args.serialized_data:
            return
        kho = self.kho
        ser_pa = args.serialized_data
        nr_folios, desc = abi.MEMFD_SER.unpack(kho.memory.read(ser_pa, abi.MEMFD_SER.size))[4:]
        if nr_folios:
            decoded = self._folio_runs(nr_folios, desc)
            if decoded is not None:
                runs, area = decoded
                # The kernel only warns (rate-limited) for a folio it cannot restore.
                self._put_rest(runs, 0, 0)
                kho.vfree(area)
        kho.restore_free(ser_pa)


class _Indexes:
    """File page indexes already filled: sorted disjoint intervals, appended
    to in O(1) when they come in order (they always do from preserve)."""

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: List[int] = []
        self.ends: List[int] = []

    def first_in(self, start: int, count: int) -> Optional[int]:
        """The first index of ``start .. start + count - 1`` already seen."""
        if count <= 0 or not self.starts:
            return None
        i = bisect.bisect_right(self.starts, start) - 1
        if i >= 0 and self.ends[i] > start:
            return start
        if i + 1 < len(self.starts) and self.starts[i + 1] < start + count:
            return self.starts[i + 1]
        return None

    def add(self, start: int, count: int) -> None:
        if self.ends and self.ends[-1] == start:
            self.ends[-1] += count
            return
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, start + count)


def _restore_all(kho: KHO, pfn: int, count: int) -> None:
    """Restore whatever of ``pfn .. pfn + count - 1`` can be, skipping the
    pages that cannot (each restore stops at one)."""
    end = pfn + count
    while pfn < end:
        done, _segments = kho.restore_folios(pfn, end - pfn)
        pfn += done + 1


_CHUNK = 1 << 20


def _fill(fd: int, index: int, segments: List[Any], size: int) -> None:
    """Write the restored pages ``segments`` at page ``index`` of ``fd``
    (cut at ``size``), skipping what reads as zeros: holes of the source
    (SEEK_DATA) and zero chunks, as the new memfd's holes read as zeros."""
    for segment in segments:
        offset = index * PAGE_SIZE
        if isinstance(segment, tuple):
            run, off, count = segment
            if offset < size:
                _copy_pages(run.backing, run.index + off, fd, offset, min(count * PAGE_SIZE, size - offset))
            index += count
            continue
        if offset < size:
            data = bytes(segment) if isinstance(segment, bytearray) else segment.tobytes()
            data = data[: min(PAGE_SIZE, size - offset)]
            if data.count(0) != len(data):
                os.pwrite(fd, data, offset)
        index += 1


def _copy_pages(backing: Backing, page: int, dst: int, dst_off: int, length: int) -> None:
    if not backing.file.alive:
        return
    src = backing.file.borrow()
    try:
        base = page * PAGE_SIZE
        pos, end = base, base + length
        while pos < end:
            try:
                pos = os.lseek(src, pos, os.SEEK_DATA)
                hole = os.lseek(src, pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return  # nothing but holes from here
                raise
            stop = min(end, hole)
            while pos < stop:
                chunk = os.pread(src, min(_CHUNK, stop - pos), pos)
                if not chunk:
                    return  # the source is shorter: the rest reads as zeros
                if chunk.count(0) != len(chunk):
                    os.pwrite(dst, chunk, dst_off + pos - base)
                pos += len(chunk)
    finally:
        backing.file.give_back(src)


def _walk(memory: PhysicalMemory, pa: int, token: int, visited: Dict[int, str]) -> List[Any]:
    """The Memfd record at ``pa`` and the Problems of its folio array,
    every page of it decoded once (see FileHandler.walk)."""
    out: List[Any] = []
    where = f"memfd token {token}"
    owner = visited.get(pa >> PAGE_SHIFT)
    if owner is not None:
        return [Problem(where, f"record at {pa:#x} is a page of {owner} too (a page restores only once): "
                               f"not decoded again")]
    visited[pa >> PAGE_SHIFT] = where
    pos, size, seals, flags, nr, desc = abi.MEMFD_SER.unpack(memory.read(pa, abi.MEMFD_SER.size))
    first, total, _vm_flags, order = abi.KHO_VMALLOC.unpack(desc)
    pages: List[int] = []
    chunk = first
    shared = False
    while chunk and len(pages) <= total:
        if chunk >> PAGE_SHIFT in visited:
            shared = True
            break
        visited[chunk >> PAGE_SHIFT] = f"the folio array of {where}"
        raw = memory.read(chunk, PAGE_SIZE)
        for i in range(abi.KHO_VMALLOC_SIZE):
            phys = abi.U64.unpack_from(raw, 8 + 8 * i)[0]
            if not phys:
                break
            pages.append(phys)
        chunk = abi.U64.unpack_from(raw, 0)[0]
    if chunk:
        out.append(Problem(where, "folio array chunks form a cycle, overflow or are shared" if not shared else
                           f"folio array chunk at {chunk:#x} was reached before (a page restores only once)"))
    if len(pages) != total:
        out.append(Problem(where, f"folio array lists {len(pages)} pages, descriptor says {total}"))
    # Only as many pages as the entries claimed need, each once.
    wanted = min(max(0, total), -(-nr // ENTRIES_PER_PAGE))
    objects: List[object] = []
    for phys in pages[:wanted]:
        pfn = phys >> PAGE_SHIFT
        if pfn in visited or (phys % PAGE_SIZE and pfn + 1 in visited):
            out.append(Problem(where, f"folio array page at {phys:#x} was reached before (a page restores only "
                                      f"once): the array stops there"))
            break
        visited[pfn] = f"the folio array of {where}"
        page = memory.pages.get(pfn) if not phys % PAGE_SIZE else None
        objects.append(page if page is not None else memory.read(phys, PAGE_SIZE))
    folios = FolioTable(objects, min(nr, len(objects) * ENTRIES_PER_PAGE))
    count = len(folios)
    if count != nr:
        out.append(Problem(where, f"{nr} folios claimed, the array holds {count}"))
    out.insert(0, Memfd(pa, token, pos, size, seals, flags, nr, folios))
    return out


#: MFD_EXEC (Linux 6.3): the kernel's memfd_alloc_file() makes a 0777 inode
#: whatever vm.memfd_noexec says; ask the host for the same.
_MFD_EXEC = 0x0010


def _new_memfd() -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        return os.memfd_create("", flags | _MFD_EXEC)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES):
            raise
        return os.memfd_create("", flags)


def _host_pages() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // PAGE_SIZE
    except (ValueError, OSError):
        return _MAX_FOLIOS


def _host_seals(fd: int) -> int:
    return fcntl.fcntl(fd, _host.F_GET_SEALS)
