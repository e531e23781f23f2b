"""Find the session create that first fails with ENOSPC (the kho_block cap).

Run in a vmtest guest against the real device (``--backend device``) or
anywhere against the emulator (``--backend emulator``). Creates outgoing
sessions (see :func:`session_name`) with bare ioctls (the per-create cost dominates
a run of half a million creates, so no library objects per session) until
one fails, then prints one JSON line with the index of the failing create,
its errno and timings. ``--limit N`` stops after N creates instead (for
measuring the cost curve).

The kernel's numbers: a session entry (struct luo_session_ser) is 64 bytes
of name plus a 16-byte file-set header = 80 bytes; a 4 KiB block has a
16-byte header, so (4096 - 16) // 80 = 51 sessions per block; the chain
holds at most KHO_MAX_BLOCKS = 10000 blocks. Creates 0..509,999 succeed
and create #510,000 (0-based) is the first to need block 10,001: ENOSPC.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from liveupdate import _abi  # noqa: E402

SESSIONS_PER_BLOCK = (4096 - 16) // 80
MAX_BLOCKS = 10000
EXPECTED_INDEX = SESSIONS_PER_BLOCK * MAX_BLOCKS


def raise_fd_limit(needed: int) -> int:
    """Make room for ``needed`` open fds: the session fds stay open (closing
    one releases its session). Root may raise the hard limit up to
    fs.nr_open, which is raised first when it is too low."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
        if nr_open < needed:
            with open("/proc/sys/fs/nr_open", "w") as f:
                f.write(str(needed))
            nr_open = needed
    except OSError:
        nr_open = needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        except (ValueError, OSError):
            # Without CAP_SYS_RESOURCE (a container) only the hard limit is
            # reachable; the caller sees the limit it got and skips.
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def session_name(index: int) -> bytes:
    """A unique name whose first byte cycles through 1..255: the kernel
    compares a new name with every outgoing session's (strncmp over a
    list, before the insert), so names that differ in their first byte
    keep each comparison to one byte. Half a million creates are
    quadratic in that walk; this is the cheapest it gets."""
    return bytes((1 + index % 255,)) + b"%x" % (index // 255)


def open_port(backend: str):
    """(port, device fd, keepalive) for ``backend``."""
    if backend == "device":
        from liveupdate import _port

        return _port.DEVICE, _port.DEVICE.open_device("/dev/liveupdate"), None
    from liveupdate.emulator import Emulator

    emu = Emulator()
    return emu.port, emu.port.open_device("/dev/liveupdate"), emu


def _try_create(ioctl, dev: int, name: bytes) -> str:
    try:
        ioctl(dev, _abi.IOCTL_CREATE_SESSION, _abi.CREATE_SESSION.pack(_abi.CREATE_SESSION.size, -1, name))
        return "created"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def run(backend: str, limit: int, progress: int) -> dict:
    # Room for every session fd plus the emulator's own read end per
    # session (it keeps those above the program's fds).
    fds_needed = (limit or EXPECTED_INDEX + 16) * (2 if backend == "emulator" else 1) + 4096
    nofile = raise_fd_limit(fds_needed)
    port, dev, keep = open_port(backend)
    ioctl = port.ioctl
    pack = _abi.CREATE_SESSION.pack
    size = _abi.CREATE_SESSION.size
    cmd = _abi.IOCTL_CREATE_SESSION
    start = time.monotonic()
    checkpoints = []
    index = 0
    failure = None
    last_fd = -1
    while not limit or index < limit:
        try:
            out = ioctl(dev, cmd, pack(size, -1, session_name(index)))
        except OSError as exc:
            failure = exc
            break
        last_fd = _abi.CREATE_SESSION.unpack(out)[1]
        index += 1
        if progress and index % progress == 0:
            elapsed = time.monotonic() - start
            checkpoints.append((index, round(elapsed, 2)))
            print("block_cap: %d sessions in %.1f s" % (index, elapsed), file=sys.stderr, flush=True)
    result = {
        "backend": backend,
        "created": index,
        "failed_index": index if failure is not None else None,
        "errno": failure.errno if failure is not None else None,
        "errname": errno.errorcode.get(failure.errno, "?") if failure is not None else None,
        "expected_index": EXPECTED_INDEX,
        "seconds": round(time.monotonic() - start, 2),
        "nofile": nofile,
        "checkpoints": checkpoints,
    }
    if failure is not None and failure.errno == errno.ENOSPC:
        # The cap counts blocks, not creates: a failed create leaves the
        # chain as it was, so the next one fails the same way; closing one
        # session frees one entry (its block stays, still needed), so one
        # create fits again.
        result["retry"] = _try_create(ioctl, dev, b"again")
        port.close(last_fd)
        result["after_close"] = _try_create(ioctl, dev, b"after-close")
    del keep
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["device", "emulator"], required=True)
    p.add_argument("--limit", type=int, default=0, help="stop after this many creates")
    p.add_argument("--progress", type=int, default=10000, help="report every N creates")
    p.add_argument("--out", help="also write the JSON result here")
    args = p.parse_args(argv)
    result = run(args.backend, args.limit, args.progress)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
