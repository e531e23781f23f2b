"""luo-own.service / luo-own-keep.service: a session the service makes
itself and keeps in its fd store. "carry" moves the files into a new
session on every boot after a kexec (liveupdate.systemd.carry_session);
"keep" only retrieves them, which the kernel does not hand over again."""
import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenarios import OWN_CARRY, OWN_FDNAME, OWN_KEEP, SESSION_FILES  # noqa: E402
from tierlib import Report, error_of, file_record, memfd, ready_and_wait  # noqa: E402

import liveupdate  # noqa: E402
from liveupdate import systemd  # noqa: E402

mode = sys.argv[1]
unit = "luo-own.service" if mode == "carry" else "luo-own-keep.service"
report = Report(unit)
found = systemd.find_sessions()
session = found.get(OWN_FDNAME)
report.event("found", state=session.state if session else None, unfinished=found.unfinished,
             failed={k: v.errno for k, v in found.failed.items()})
kept = []  # what must stay open while the service runs
try:
    if OWN_FDNAME in found.unfinished or (session is not None and session.state == "incoming"):
        if mode == "carry":
            carried = systemd.carry_session(session, list(SESSION_FILES), name=OWN_FDNAME)
            kept.append(carried.session)
            report.event("carried", state=carried.session.state, session=carried.session.name,
                         files={str(t): file_record(fd) for t, fd in carried.fds.items()})
            carried.close()
        else:
            files = {t: session.retrieve(t) for t in SESSION_FILES}
            kept.append(session)
            report.event("retrieved", files={str(t): file_record(fd) for t, fd in files.items()})
            for fd in files.values():
                os.close(fd)
    elif session is None:
        with liveupdate.open(timeout=30) as dev:
            session = dev.create_session(OWN_CARRY if mode == "carry" else OWN_KEEP)
        for token, f in SESSION_FILES.items():
            fd = memfd(f.label, f.size, f.seals)
            session.preserve(fd, token)
            os.close(fd)
        systemd.store_session(session, OWN_FDNAME)
        systemd.barrier()
        kept.append(session)
        report.event("created", session=session.name)
    else:
        # A plain restart: the session is still outgoing; a preserve at a
        # token it holds says EEXIST, which shows the files are still in it.
        probe = os.memfd_create("probe")
        try:
            session.preserve(probe, min(SESSION_FILES))
            report.event("restarted", probe="preserved")
        except OSError as exc:
            report.event("restarted", probe=errno.errorcode.get(exc.errno, exc.errno))
        os.close(probe)
        kept.append(session)
except OSError as exc:
    report.event("error", **error_of(exc))
report.write()
ready_and_wait()
