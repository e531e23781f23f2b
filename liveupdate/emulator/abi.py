"""The byte layouts one emulated kernel hands to the next (KHO/LUO ABI).

Everything here is ``__packed`` little-endian, as in Linux 7.3's
``include/linux/kho/abi/{luo,block,memfd,kexec_handover}.h``. The emulator
writes and reads these bytes in its emulated physical memory exactly where
the kernel would, so a walk of that memory (``liveupdate.emulator.walk``)
shows what a real kernel would find after a kexec.

====================  =====  ==================================================
struct                bytes  fields
====================  =====  ==================================================
luo_ser (root)          32   compatible[8] "luo-v5", liveupdate_num, sessions_pa,
                             flbs_pa
kho_block_header_ser    16   next (pa of the next block, 0 ends), count
luo_session_ser         80   name[64], file_set_ser {files (pa), count}
luo_file_ser            64   compatible[48] "memfd-v2", data (pa), token
memfd_luo_ser           48   pos, size, seals u32, flags u32, nr_folios,
                             folios: kho_vmalloc
kho_vmalloc             16   first (pa of the first chunk), total_pages u32,
                             flags u16, order u16
kho_vmalloc_chunk     4096   next (pa), phys[511] (0-terminated page list)
memfd_luo_folio_ser     16   pfn:52 | flags:12 (one u64), index
luo_flb_header_ser      16   pgcnt, count
====================  =====  ==================================================
"""
from __future__ import annotations

import struct

#: KHO does not support a kexec between kernels with different page sizes;
#: the emulator is a 4 KiB-page machine (x86-64, arm64 with 4K pages).
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

LUO_KHO_ENTRY_NAME = "LUO"
LUO_ABI_COMPATIBLE = b"luo-v5"
#: sizeof("luo-v5") rounded up to 8, the width of the root's string field.
LUO_ABI_COMPAT_LEN = 8
NAME_LENGTH = 64
HNDL_COMPAT_LENGTH = 48

LUO_SER = struct.Struct(f"<{LUO_ABI_COMPAT_LEN}sQQQ")
BLOCK_HEADER = struct.Struct("<QQ")
SESSION_SER = struct.Struct(f"<{NAME_LENGTH}sQQ")
FILE_SER = struct.Struct(f"<{HNDL_COMPAT_LENGTH}sQQ")
KHO_VMALLOC = struct.Struct("<QIHH")
MEMFD_SER = struct.Struct("<QQIIQ16s")
FOLIO_SER = struct.Struct("<QQ")
FLB_HEADER = struct.Struct("<QQ")
U64 = struct.Struct("<Q")

assert LUO_SER.size == 32 and BLOCK_HEADER.size == 16
assert SESSION_SER.size == 80 and FILE_SER.size == 64
assert MEMFD_SER.size == 48 and KHO_VMALLOC.size == 16 and FOLIO_SER.size == 16

MEMFD_LUO_FH_COMPATIBLE = b"memfd-v2"
MEMFD_LUO_FOLIO_DIRTY = 1 << 0
MEMFD_LUO_FOLIO_UPTODATE = 1 << 1
PFN_BITS = 52
PFN_MASK = (1 << PFN_BITS) - 1

# The seals of <linux/fcntl.h>; memfd-v2 knows all six.
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020
MEMFD_LUO_ALL_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC

#: Entries of physical addresses in one vmalloc chunk page (after its next).
KHO_VMALLOC_SIZE = (PAGE_SIZE - 8) // 8
#: kho_vmalloc.flags bit for an area that came from vmalloc()/vcalloc().
KHO_VMALLOC_ALLOC = 0x0001
KHO_VMALLOC_HUGE_VMAP = 0x0002
KHO_VMALLOC_SUPPORTED = KHO_VMALLOC_ALLOC | KHO_VMALLOC_HUGE_VMAP

#: One page is reserved for the (here always empty) File-Lifecycle-Bound
#: objects table; memfd registers no FLB.
LUO_FLB_PGCNT = 1


def cstr(raw: bytes) -> bytes:
    """The bytes of a fixed-size C string field up to its first NUL."""
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def compatible_is(field: bytes, expected: bytes) -> bool:
    """Whether a compatible-string field says ``expected``, compared as the
    kernel does (strncmp over the field's width): the whole string, opaque,
    up to its NUL. No prefix or version number is read out of it, so a
    composite string (``luo-v5;block-v1``, proposed upstream) is simply
    another string, refused by a kernel that does not know it."""
    return cstr(field) == expected[: len(field)]


def strscpy(raw: bytes, size: int) -> bytes:
    """What the kernel's strscpy(dst, raw, size) leaves in ``dst``: at most
    ``size - 1`` bytes of the string, NUL-padded to ``size``."""
    return cstr(raw)[: size - 1].ljust(size, b"\0")


def folio_pack(pfn: int, flags: int, index: int) -> bytes:
    """memfd_luo_folio_ser: the pfn in the low 52 bits, flags in the top 12."""
    return FOLIO_SER.pack((pfn & PFN_MASK) | ((flags & 0xFFF) << PFN_BITS), index)


def folio_unpack(raw: bytes, offset: int = 0) -> "tuple[int, int, int]":
    """(pfn, flags, index) of the memfd_luo_folio_ser at ``offset``."""
    word, index = FOLIO_SER.unpack_from(raw, offset)
    return word & PFN_MASK, word >> PFN_BITS, index
