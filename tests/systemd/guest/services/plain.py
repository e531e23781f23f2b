"""luo-plain.service: plain memfds in the fd store, which systemd carries
through every kexec by itself. On each start: take back what systemd
passed, store what is missing."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenarios import PLAIN  # noqa: E402
from tierlib import Report, memfd, ready_and_wait  # noqa: E402

from liveupdate import systemd  # noqa: E402

report = Report("luo-plain.service")
have = {entry.name for entry in systemd.listen_fds()}
stored = []
for f in PLAIN:
    if f.name not in have:
        fd = memfd(f.label, f.size, f.seals)
        systemd.store_fd(fd, f.name)
        os.close(fd)
        stored.append(f.name)
if stored:
    systemd.barrier()
    report.event("stored", names=stored)
report.write()
ready_and_wait()
