"""The data each service of the systemd tier keeps, shared by the services
(in the guest) and the tests (on the host), so both know what to expect."""
from __future__ import annotations

import hashlib
from typing import Dict, List, NamedTuple

# The kernel name systemd 262 gives a LUOSession= session, as the emulated
# manager derives it; the tier checks it against the real systemd's.
from liveupdate.emulator.systemd.service import luo_session_kernel_name  # noqa: F401

SEAL_SEAL, SEAL_SHRINK, SEAL_GROW, SEAL_WRITE = 0x1, 0x2, 0x4, 0x8


class File(NamedTuple):
    name: str      # fd store name (plain memfds) or a label
    size: int
    seals: int

    @property
    def label(self) -> str:
        return "tier/" + self.name


def digest_of(label: str, size: int) -> str:
    """The digest tierlib.pattern(label, size) has: what the host expects."""
    block = hashlib.sha256(label.encode()).digest()
    data = (block * (size // len(block) + 1))[:size]
    return hashlib.sha256(data).hexdigest()[:16]


#: luo-plain.service: memfds in the fd store, nothing else.
PLAIN: List[File] = [
    File("cache", 65536, 0),
    File("sealed", 5000, SEAL_SEAL | SEAL_SHRINK | SEAL_GROW),
    File("write-sealed", 3000, SEAL_WRITE),
    File("empty", 0, 0),
    File("big", 4 << 20, 0),
]

#: The files of the sessions (own and LUOSession=), by token.
SESSION_FILES: Dict[int, File] = {
    1: File("alpha", 10000, 0),
    7: File("beta", 100, SEAL_SHRINK | SEAL_GROW),
}

#: Kernel names of the sessions the services make themselves.
OWN_CARRY = "tier-own-carry"
OWN_KEEP = "tier-own-keep"
#: The fd store name every session service uses.
OWN_FDNAME = "ownsess"
LUO_FDNAME = "libd"

#: unit -> (program, arguments)
SERVICES = {
    "luo-plain.service": "plain.py",
    "luo-own.service": "own.py carry",
    "luo-own-keep.service": "own.py keep",
    "luo-libd.service": "libd.py carry",
    "luo-libd-keep.service": "libd.py keep",
    "luo-drop.service": "drop.py",
}
