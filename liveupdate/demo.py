"""A live update in thirty lines: ``python -m liveupdate.demo``.

Puts a message in a memfd, preserves it in a session, goes through a kexec
and reads the message back from the new kernel. With no /dev/liveupdate
(most machines today) it runs on the in-process emulator, whose kexec is
emulated; on a real LUO kernel it stops before the kexec and says how to
do the second half, since a real kexec ends this process.
"""
from __future__ import annotations

import os
import sys

import liveupdate

MESSAGE = b"state that outlives the kernel\n"
TOKEN = 0x1D


def main() -> int:
    if os.path.exists(liveupdate.DEFAULT_PATH):
        print(f"{liveupdate.DEFAULT_PATH} exists: this is a real Live Update kernel.")
        print("This demo only runs on the emulator; see README.md for a real round trip.")
        return 0
    try:
        emu = liveupdate.Emulator()
    except ImportError as exc:
        print(f"no {liveupdate.DEFAULT_PATH} here and the emulator is unavailable ({exc})", file=sys.stderr)
        return 1
    print(f"no {liveupdate.DEFAULT_PATH} on this machine: using the emulator, {emu!r}")

    memfd = os.memfd_create("demo")
    os.write(memfd, MESSAGE)
    with emu.open() as dev:
        session = dev.create_session("demo")
        session.preserve(memfd, TOKEN)
        print(f"before kexec: preserved memfd {memfd} as token {TOKEN:#x} in {session!r}")
    os.close(memfd)  # the session holds the file now

    emu.kexec()
    session.close()  # a handle of the old kernel: closing it is all it can do
    print(f"kexec done: liveupdate number is now {emu.liveupdate_num}")

    with emu.open() as dev, dev.retrieve_session("demo") as session:
        fd = session.retrieve(TOKEN)
        data = os.pread(fd, 4096, 0)
        session.finish()
        os.close(fd)
    print(f"after kexec: retrieved token {TOKEN:#x} from session 'demo': {data!r}")
    return 0 if data == MESSAGE else 1


if __name__ == "__main__":
    sys.exit(main())
