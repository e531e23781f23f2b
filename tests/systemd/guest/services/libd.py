"""luo-libd.service / luo-libd-keep.service: LUOSession=libd, a session
systemd makes for the unit and passes in its fd store under "libd".
On a first start the session is fresh (outgoing, empty): preserve the
files. After a kexec it is incoming: "carry" moves the files into a new
session (liveupdate.systemd.carry_session), "keep" only retrieves them."""
import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scenarios import LUO_FDNAME, SESSION_FILES  # noqa: E402
from tierlib import Report, error_of, file_record, memfd, ready_and_wait  # noqa: E402

from liveupdate import systemd  # noqa: E402

mode = sys.argv[1]
unit = "luo-libd.service" if mode == "carry" else "luo-libd-keep.service"
report = Report(unit)
found = systemd.find_sessions()
session = found.get(LUO_FDNAME)
report.event("found", state=session.state if session else None, session=session.name if session else None,
             unfinished=found.unfinished, failed={k: v.errno for k, v in found.failed.items()})
kept = []
try:
    if LUO_FDNAME in found.unfinished or (session is not None and session.state == "incoming"):
        if mode == "carry":
            carried = systemd.carry_session(session, list(SESSION_FILES), name=LUO_FDNAME)
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
    elif session is not None:
        # Outgoing: fresh (preserve succeeds) or kept over a restart (EEXIST).
        outcome = {}
        for token, f in SESSION_FILES.items():
            fd = memfd(f.label, f.size, f.seals)
            try:
                session.preserve(fd, token)
                outcome[str(token)] = "preserved"
            except OSError as exc:
                outcome[str(token)] = errno.errorcode.get(exc.errno, str(exc.errno))
            os.close(fd)
        kept.append(session)
        report.event("outgoing", preserve=outcome)
except OSError as exc:
    report.event("error", **error_of(exc))
report.write()
ready_and_wait()
