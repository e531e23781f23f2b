"""A small daemon for the emulated manager's tests: it keeps a memfd in its
fd store and, in its own session, a second memfd, and says what it got."""
import json
import os
import sys
import time

import liveupdate
from liveupdate import systemd

report = {"listen": [e.name for e in systemd.listen_fds()], "env": {
    k: os.environ.get(k) for k in ("FDSTORE", "LISTEN_FDS", "LISTEN_FDNAMES")}}
passed = {e.name: e.fd for e in systemd.listen_fds()}
found = systemd.find_sessions()
session = found.get("sess")
if "data" in passed:
    report["data"] = os.pread(passed["data"], 100, 0).decode()
else:
    fd = os.memfd_create("data")
    os.write(fd, b"kept by the fd store")
    systemd.store_fd(fd, "data")
if session is None:
    with liveupdate.open() as dev:
        session = dev.create_session("daemon-sess")
    fd = os.memfd_create("in-session")
    os.write(fd, b"kept in my session")
    session.preserve(fd, 3)
    systemd.store_session(session, "sess")
elif session.state == "incoming" or "sess" in found.unfinished:
    carried = systemd.carry_session(session, [3], name="sess")
    report["session"] = os.pread(carried.fds[3], 100, 0).decode()
    session = carried.session
else:
    report["session"] = "outgoing: " + session.name
systemd.barrier()
print(json.dumps(report), flush=True)
systemd.notify("READY=1")
while True:
    time.sleep(60)
