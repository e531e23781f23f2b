#!/usr/bin/env python3
"""Cost of the binding's ioctl path against the raw system call in C.

A benchmark, not a test. /dev/liveupdate is rare, so this times an ioctl
that every Linux kernel has (FIONREAD on a pipe) through the exact call path
that Session.preserve uses: pack the 16-byte argument struct, call the
device port's ioctl, unpack. The baseline is the same ioctl in a C loop,
compiled and measured in this same run. The last line printed is the ratio
(target: at most 1.5).

The ratio depends on how long the chosen ioctl takes in the kernel: Python's
own cost per call (a bound-method call, argument packing, releasing the GIL)
is a fixed few hundred nanoseconds, so the cheaper the system call, the
larger the ratio. The script also prints bare ``fcntl.ioctl`` with a constant
argument, the floor of any Python path, to show what is the binding's own.

    python tools/bench_binding.py [--calls N] [--runs R]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liveupdate import _abi, _port  # noqa: E402
from liveupdate import session as session_module  # noqa: E402

C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long calls = atol(argv[1]);
    int fds[2], n;
    struct timespec a, b;

    if (pipe(fds))
        return 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < calls; i++)
        if (ioctl(fds[0], FIONREAD, &n))
            return 2;
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / calls);
    return 0;
}
"""


def c_ns_per_call(calls: int, workdir: Path) -> float:
    exe = workdir / "ioctl_loop"
    if not exe.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            sys.exit("bench_binding: needs a C compiler for the baseline (apt-get install gcc)")
        (workdir / "ioctl_loop.c").write_text(C_SOURCE)
        subprocess.run([cc, "-O2", "-o", str(exe), str(workdir / "ioctl_loop.c")], check=True)
    out = subprocess.run([str(exe), str(calls)], check=True, capture_output=True, text=True)
    return float(out.stdout)


def binding_ns_per_call(calls: int) -> float:
    """The body of Session.preserve's fast path, with FIONREAD in place of
    the LUO command: the same packer, the same port call, the same checks."""
    r, w = os.pipe()
    try:
        ioctl = _port.DEVICE.ioctl
        pack = session_module._pack_fd_token
        size = session_module._FD_TOKEN_SIZE
        cmd = termios.FIONREAD
        fd, token = 3, 7
        start = time.perf_counter_ns()
        for _ in range(calls):
            if type(token) is not int or not 0 <= token <= 0xFFFFFFFFFFFFFFFF:
                raise AssertionError
            ioctl(r, cmd, pack(size, fd, token))
        return (time.perf_counter_ns() - start) / calls
    finally:
        os.close(r)
        os.close(w)


def bare_fcntl_ns_per_call(calls: int) -> float:
    """For reference: fcntl.ioctl with a constant argument, nothing else."""
    import fcntl

    r, w = os.pipe()
    try:
        arg = bytes(4)
        ioctl = fcntl.ioctl
        cmd = termios.FIONREAD
        start = time.perf_counter_ns()
        for _ in range(calls):
            ioctl(r, cmd, arg)
        return (time.perf_counter_ns() - start) / calls
    finally:
        os.close(r)
        os.close(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    assert _abi.PRESERVE_FD.size == 16
    results = {"c": [], "fcntl": [], "binding": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(opts.runs):  # interleaved, so drift hits all three alike
            results["c"].append(c_ns_per_call(opts.calls, Path(tmp)))
            results["fcntl"].append(bare_fcntl_ns_per_call(opts.calls))
            results["binding"].append(binding_ns_per_call(opts.calls))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"python {sys.version.split()[0]}, {opts.calls} calls x {opts.runs} runs, medians per call:")
    print(f"  raw ioctl in C             {med['c'] / 1000:8.3f} us")
    print(f"  bare fcntl.ioctl           {med['fcntl'] / 1000:8.3f} us  ({med['fcntl'] / med['c']:.2f}x C)")
    print(f"  binding call path          {med['binding'] / 1000:8.3f} us  ({med['binding'] / med['c']:.2f}x C)")
    print(f"  binding over the bare-Python floor: {med['binding'] / med['fcntl']:.2f}x")
    print(f"binding/C ratio: {med['binding'] / med['c']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
