"""luo-drop.service: fds that systemd or the kernel may not carry, next to
ones they do, all in the fd store with FileDescriptorStorePreserve=yes.
Before the kexec the stage driver asks `liveupdate check` what will
survive; the host compares that with what this service finds after it."""
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenarios import SEAL_WRITE  # noqa: E402
from tierlib import REPORTS, Report, memfd, ready_and_wait  # noqa: E402

import liveupdate  # noqa: E402
from liveupdate import systemd  # noqa: E402

report = Report("luo-drop.service")
DATA = os.path.dirname(REPORTS)   # a directory on a disk
TMPFS = os.environ.get("LUO_TIER_TMPFS", "/dev/shm")   # tmpfs, in the guest and on a host
if not systemd.listen_fds():
    keep = []
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    regular = os.open(os.path.join(DATA, "regular-file"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(regular, b"a file on a disk")
    unlinked_path = os.path.join(TMPFS, "luo-drop-unlinked")
    unlinked = os.open(unlinked_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(unlinked, b"a tmpfs file, unlinked")
    os.unlink(unlinked_path)
    tmpfs = os.open(os.path.join(TMPFS, "luo-drop-tmpfs"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(tmpfs, b"a tmpfs file, still linked")
    both = memfd("tier/inboth", 4096)
    with liveupdate.open(timeout=30) as dev:
        session = dev.create_session("tier-drop")
    session.preserve(both, 1)
    # (name, fd, poll): FDPOLL=0 keeps systemd from dropping a socket or a
    # pipe when its peer goes away with this process.
    items = [
        ("memfd", memfd("tier/memfd", 1000), True),
        ("write-sealed", memfd("tier/write-sealed", 1000, SEAL_WRITE), True),
        ("socket", left.fileno(), False),
        ("pipe", read_end, False),
        ("eventfd", os.eventfd(0), True),
        ("directory", os.open(DATA, os.O_RDONLY | os.O_DIRECTORY), True),
        ("regular", regular, True),
        ("tmpfs", tmpfs, True),
        ("unlinked", unlinked, True),
        ("inboth", both, True),
        ("dropsess", session.fileno(), True),
    ]
    for name, fd, poll in items:
        systemd.store_fd(fd, name, poll=poll)
    # No FDNAME at all: systemd names it "stored".
    unnamed = memfd("tier/unnamed", 500)
    systemd.notify("FDSTORE=1", [unnamed])
    systemd.barrier()
    report.event("stored", names=[name for name, _, _ in items] + ["(no FDNAME)"])
    keep += [left, right, write_end, session]
report.write()
ready_and_wait()
