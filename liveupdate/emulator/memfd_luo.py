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

import errno
import fcntl
import os
import stat
import warnings
from typing import Any, Container, List, Optional, Set, Tuple

from . import _host, abi
from .kfile import KernelFile
from .kho import KHO, PAGE_SHIFT, PAGE_SIZE, Backing, FolioPage

__all__ = ["MemfdHandler"]

_FOLIO_FLAGS = abi.MEMFD_LUO_FOLIO_DIRTY | abi.MEMFD_LUO_FOLIO_UPTODATE
_MAX_FOLIOS = 0xFFFFFFFF  # memfd_pin_folios() counts folios in an unsigned int


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


class MemfdHandler:
    """liveupdate_file_handler for memfds, bound to one kernel's KHO."""

    compatible = abi.MEMFD_LUO_FH_COMPATIBLE

    def __init__(self, kho: KHO, in_use: Optional[Container[Any]] = None) -> None:
        self.kho = kho
        # The kernel's index of files held by sessions (luo_preserved_files):
        # the no-copy retrieve must not hand out an inode already held.
        self.in_use: Container[Any] = in_use if in_use is not None else ()

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
        """Raises OSError: EOPNOTSUPP (unknown seals), EFBIG (too many pages)."""
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
            if npages > _host_pages():
                # The kernel pins a page for every index, holes included, and
                # runs out of memory long before; so does the emulator.
                raise OSError(errno.ENOMEM, f"the memfd has {npages} pages, more than this machine's RAM")
        except BaseException:
            kho.unpreserve_free(ser_pa)
            raise
        desc = bytes(abi.KHO_VMALLOC.size)
        private = _Private([], 0, 0, size, seals)
        if npages:
            backing = Backing(args.file, (st.st_dev, st.st_ino))
            first = kho.preserve_folios(backing, npages)
            pack = abi.folio_pack
            table = b"".join([pack(first + i, _FOLIO_FLAGS, i) for i in range(npages)])
            area = kho.vmalloc(table)
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
            for pfn in range(private.first_pfn, private.first_pfn + private.npages):
                kho.unpreserve_folio(pfn)
            kho.vfree(private.area)
        kho.unpreserve_free(args.serialized_data)

    # -- after the kexec --------------------------------------------------------
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
            folios: List[Tuple[int, int, int]] = []
            area: List[int] = []
            if nr_folios:
                restored = kho.restore_vmalloc(desc)
                if restored is None:
                    raise OSError(errno.EINVAL, "the memfd's folio array cannot be restored")
                table, area = restored
                # The kernel trusts nr_folios; entries past the area would be
                # out of bounds there. Here they do not exist.
                count = min(nr_folios, len(table) // abi.FOLIO_SER.size)
                folios = [abi.folio_unpack(table, i * abi.FOLIO_SER.size) for i in range(count)]
            try:
                file = self._reuse(folios, pos, size, seals)
                if file is None:
                    file = self._build(folios, pos, size, seals)
            finally:
                kho.vfree(area)
            args.file = file
        finally:
            kho.restore_free(ser_pa)

    def _reuse(self, folios: List[Tuple[int, int, int]], pos: int, size: int, seals: int) -> Optional[KernelFile]:
        """The no-copy path: reopen the memfd whose own pages these are."""
        npages = -(-size // PAGE_SIZE)
        if not folios or len(folios) != npages or pos > _host.MAX_LFS_FILESIZE:
            return None
        kho, pages = self.kho, self.kho.memory.pages
        backing: Optional[Backing] = None
        for i, (pfn, flags, index) in enumerate(folios):
            page = pages.get(pfn)
            if (index != i or not flags & abi.MEMFD_LUO_FOLIO_UPTODATE or pfn not in kho.incoming
                    or not isinstance(page, FolioPage) or page.index != i):
                return None
            if backing is None:
                backing = page.backing
            elif page.backing is not backing:
                return None
        assert backing is not None
        if backing.ino in self.in_use:
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
        for pfn, _flags, _index in folios:
            kho.restore_folio(pfn << PAGE_SHIFT)
        return file

    def _build(self, folios: List[Tuple[int, int, int]], pos: int, size: int, seals: int) -> KernelFile:
        """The general path: a new memfd filled from the restored pages."""
        kho = self.kho
        fd = _host.kernel_fd(_new_memfd)
        try:
            if size > _host.MAX_LFS_FILESIZE:
                raise OSError(errno.EFBIG, f"size {size} cannot be represented by the host")
            os.ftruncate(fd, size)
            seen: Set[int] = set()
            for i, (pfn, flags, index) in enumerate(folios):
                if not pfn:
                    continue
                page = kho.restore_folio(pfn << PAGE_SHIFT)
                if page is None:
                    self._put_rest(folios, i + 1)
                    raise OSError(errno.EIO, f"folio at {pfn << PAGE_SHIFT:#x} was not preserved")
                if index in seen:
                    self._put_rest(folios, i + 1)
                    raise OSError(errno.EEXIST, f"two folios for page {index}")
                seen.add(index)
                offset = index * PAGE_SIZE
                if flags & abi.MEMFD_LUO_FOLIO_UPTODATE and offset < size:
                    data = _page_data(page)
                    data = data[: min(PAGE_SIZE, size - offset)]
                    if data.count(0) != len(data):
                        os.pwrite(fd, data, offset)
            if pos <= _host.MAX_LFS_FILESIZE:
                os.lseek(fd, pos, os.SEEK_SET)
            if seals:
                fcntl.fcntl(fd, _host.F_ADD_SEALS, seals)
        except BaseException:
            os.close(fd)
            raise
        return KernelFile.adopt(fd)

    def _put_rest(self, folios: List[Tuple[int, int, int]], start: int) -> None:
        for pfn, _flags, _index in folios[start:]:
            if pfn:
                self.kho.restore_folio(pfn << PAGE_SHIFT)

    def finish(self, args: Any) -> None:
        """Give back the pages of a file never retrieved."""
        if args.retrieve_status or not args.serialized_data:
            return
        kho = self.kho
        ser_pa = args.serialized_data
        nr_folios, desc = abi.MEMFD_SER.unpack(kho.memory.read(ser_pa, abi.MEMFD_SER.size))[4:]
        if nr_folios:
            restored = kho.restore_vmalloc(desc)
            if restored is not None:
                table, area = restored
                count = min(nr_folios, len(table) // abi.FOLIO_SER.size)
                for i in range(count):
                    pfn = abi.folio_unpack(table, i * abi.FOLIO_SER.size)[0]
                    if pfn and kho.restore_folio(pfn << PAGE_SHIFT) is None:
                        pass  # the kernel only warns (rate-limited) here
                kho.vfree(area)
        kho.restore_free(ser_pa)


def _page_data(page: Any) -> bytes:
    if isinstance(page, FolioPage):
        return page.backing.read(page.index)
    return bytes(page).ljust(PAGE_SIZE, b"\0")


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
