#!/usr/bin/env python3
"""A daemon's start after a kexec, as ratios: process start to its first
retrieved fd, and to the end of taking its files back.

A daemon's blackout across a live update includes its own start in the new
kernel: the interpreter, the imports, then the LUO calls. This measures,
after one real kexec, a fresh process that opens /dev/liveupdate, retrieves
its session, retrieves each of its N memfds (default 500), finishes the
session and exits, written three ways:

``C``
    raw ioctl(2), compiled here at bench time;
``bare Python``
    ``fcntl.ioctl`` + ``struct`` only, the floor for any Python program;
``liveupdate``
    ``import liveupdate``, ``open()``, ``retrieve_session``, ``retrieve``,
    ``finish``.

The package is byte-compiled first, as an installed one is (pip compiles
at install). Each figure is the median over the runs (the implementations
take turns);
times are taken on CLOCK_MONOTONIC, from just before the spawn to the
child's first retrieved fd and to its exit. The target is liveupdate within
1.2x of bare Python. It needs a kexec, so it runs in a LUO kernel under
QEMU: ``tools/bench_startup.py --vm`` (stage 1 preserves a session per
implementation and run; stage 2 measures).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.2
IMPLS = ("C", "bare Python", "liveupdate")

BARE = r"""
import fcntl, os, struct, sys, time
name, count = sys.argv[1].encode(), int(sys.argv[2])
dev = os.open("/dev/liveupdate", os.O_RDWR | os.O_CLOEXEC)
out = fcntl.ioctl(dev, 0xBA01, struct.pack("=Ii64s", 72, -1, name))
session = struct.unpack("=Ii64s", out)[1]
os.close(dev)
first = None
for token in range(count):
    fd = struct.unpack("=IiQ", fcntl.ioctl(session, 0xBA41, struct.pack("=IiQ", 16, -1, token)))[1]
    if first is None:
        first = time.monotonic_ns()
    os.close(fd)
fcntl.ioctl(session, 0xBA42, struct.pack("=II", 8, 0))
os.close(session)
print(first)
"""

LIB = r"""
import os, sys, time
import liveupdate
name, count = sys.argv[1], int(sys.argv[2])
with liveupdate.open(backend="device") as dev:
    session = dev.retrieve_session(name)
first = None
for token in range(count):
    fd = session.retrieve(token)
    if first is None:
        first = time.monotonic_ns()
    os.close(fd)
session.finish()
session.close()
print(first)
"""

C_SOURCE = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
struct sess { uint32_t size; int32_t fd; uint8_t name[64]; };
struct tok { uint32_t size; int32_t fd; uint64_t token; } __attribute__((aligned(8)));
struct fin { uint32_t size; uint32_t reserved; };
int main(int argc, char **argv)
{
	struct sess s = { .size = sizeof(s), .fd = -1 };
	struct fin f = { .size = sizeof(f) };
	struct timespec ts;
	long long first = 0;
	int dev, count = atoi(argv[2]), i;
	strncpy((char *)s.name, argv[1], sizeof(s.name) - 1);
	dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
	if (dev < 0 || ioctl(dev, 0xBA01, &s)) { perror("retrieve_session"); return 1; }
	close(dev);
	for (i = 0; i < count; i++) {
		struct tok t = { .size = sizeof(t), .fd = -1, .token = i };
		if (ioctl(s.fd, 0xBA41, &t)) { perror("retrieve_fd"); return 1; }
		if (!first) { clock_gettime(CLOCK_MONOTONIC, &ts); first = ts.tv_sec * 1000000000LL + ts.tv_nsec; }
		close(t.fd);
	}
	if (ioctl(s.fd, 0xBA42, &f)) { perror("finish"); return 1; }
	close(s.fd);
	printf("%lld\n", first);
	return 0;
}
"""


def session_name(impl: str, run: int) -> str:
    return "startup-%s-%d" % (IMPLS.index(impl), run)


def stage1(args: argparse.Namespace) -> int:
    """Preserve one session of N memfds per implementation and run, keep
    them open, and kexec (this process must hold them through it)."""
    sys.path.insert(0, REPO)
    import liveupdate
    from liveupdate import kexec

    held = []
    with liveupdate.open(backend="device") as dev:
        for run in range(args.runs + 1):  # + one warm-up round
            for impl in IMPLS:
                session = dev.create_session(session_name(impl, run))
                for token in range(args.files):
                    fd = os.memfd_create("startup")
                    os.write(fd, b"file %d" % token)
                    session.preserve(fd, token)
                    os.close(fd)
                held.append(session)
    out = os.environ["LIVEUPDATE_VM_OUT"]
    with open(os.path.join(out, "stage1.rc"), "w") as f:
        f.write("0\n")
    kexec.load(os.environ["LIVEUPDATE_VM_KERNEL"], reuse_cmdline=True)
    kexec.execute()
    return 1  # not reached


def stage2(args: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="bench-startup-")
    commands = {"bare Python": [sys.executable, "-c", BARE], "liveupdate": [sys.executable, "-c", LIB]}
    c_file = os.path.join(work, "startup.c")
    with open(c_file, "w") as f:
        f.write(C_SOURCE)
    if subprocess.call([args.cc, "-O2", "-o", os.path.join(work, "startup"), c_file]) == 0:
        commands = dict(C=[os.path.join(work, "startup")], **commands)
    env = dict(os.environ, PYTHONPATH=REPO)
    first: dict = {impl: [] for impl in commands}
    total: dict = {impl: [] for impl in commands}
    for run in range(args.runs + 1):
        for impl, argv in commands.items():
            start = time.monotonic_ns()
            out = subprocess.run(argv + [session_name(impl, run), str(args.files)], capture_output=True,
                                 text=True, env=env, check=True).stdout
            end = time.monotonic_ns()
            if run:  # the first round warms the page cache
                first[impl].append((int(out) - start) / 1e6)
                total[impl].append((end - start) / 1e6)
    shutil.rmtree(work, ignore_errors=True)
    lines = ["process start after a kexec, %d memfds, medians of %d runs:" % (args.files, args.runs)]
    for title, data in (("to the first retrieved fd", first), ("to exit (all retrieved, finished)", total)):
        bare = statistics.median(data["bare Python"])
        lines.append("  " + title)
        for impl, values in data.items():
            median = statistics.median(values)
            ratio = ("   %.2fx bare Python (target <= %.1fx: %s)" % (median / bare, TARGET,
                     "met" if median / bare <= TARGET else "MISSED")) if impl == "liveupdate" else ""
            lines.append("    %-12s %8.1f ms%s" % (impl, median, ratio))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(os.environ["LIVEUPDATE_VM_OUT"], "startup.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(os.environ["LIVEUPDATE_VM_OUT"], "startup.json"), "w") as f:
        json.dump({"first_ms": first, "total_ms": total}, f)
    return 0


def run_in_vm(args: argparse.Namespace) -> int:
    # An installed package has its bytecode (pip compiles at install); the
    # guest's root is read-only and its Python writes none, so compile here.
    subprocess.check_call([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "liveupdate")])
    out = tempfile.mkdtemp(prefix="bench-startup-vm-")
    guest = "python3 tools/bench_startup.py --in-guest --runs %d --files %d --cc %s" % (args.runs, args.files, args.cc)
    vmtest = [sys.executable, os.path.join(REPO, "tools", "vmtest"), "--out", out, "--memory", "2G",
              "--timeout", str(args.timeout), "--python", sys.executable, "--kexec"]
    if args.kernel:
        vmtest += ["--kernel", args.kernel]
    rc = subprocess.call(vmtest + ["--", guest])
    path = os.path.join(out, "startup.txt")
    if os.path.exists(path):
        with open(path) as f:
            print(f.read(), end="")
        print("bench: guest results kept in %s" % out, file=sys.stderr)
    return rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--files", type=int, default=500)
    p.add_argument("--cc", default="cc")
    p.add_argument("--kernel")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--vm", action="store_true", help="run in a LUO kernel under QEMU (tools/vmtest)")
    p.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vm:
        return run_in_vm(args)
    if not args.in_guest or not os.path.exists("/dev/liveupdate"):
        print("bench: needs a kexec on a Live Update kernel; run: tools/bench_startup.py --vm", file=sys.stderr)
        return 2
    return stage1(args) if os.environ.get("LIVEUPDATE_STAGE") == "1" else stage2(args)


if __name__ == "__main__":
    sys.exit(main())
