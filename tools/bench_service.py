#!/usr/bin/env python3
"""Per-operation cost through the emulator service, next to the in-process emulator.

A benchmark, not a test: it starts a service in a temporary directory,
runs the same operations through the public API against both backends in
the same run, and prints microseconds per operation and the ratio
service / in-process. The service's cost is mostly two context switches
and a pass through its event loop per call; fd-carrying calls (preserve,
retrieve, create) also pass an fd with SCM_RIGHTS.

A second section (``--large``) preserves large sparse memfds through the
service while another client keeps making round trips: it prints that
client's latency during the preserves against its idle latency measured
just before (median, 99th percentile and worst, and their ratios), for a
session ioctl (which needs the emulated kernel) and for a status request
(which only needs the service's event loop), and the service's RSS before,
at the peak during, after the preserves and after the sessions are closed.

    python tools/bench_service.py [--n 2000] [--large] [--large-gib 4] [--large-count 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import tempfile
import time
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import liveupdate  # noqa: E402
from liveupdate.service import testing  # noqa: E402


def _best_of(runs: int, func: Callable[[], float]) -> float:
    # The minimum is the least disturbed by the other core's noise.
    return min(func() for _ in range(runs))


def measure(open_device: Callable[[], "liveupdate.Device"], kexec: Callable[[], None], n: int,
            prefix: str) -> Dict[str, float]:
    """Seconds per operation for each kind of call, on one backend."""
    results: Dict[str, float] = {}
    memfds = []
    for i in range(n):
        fd = os.memfd_create(f"bench{i}")
        os.write(fd, b"x" * 64)
        memfds.append(fd)

    def open_close() -> float:
        start = time.perf_counter()
        for _ in range(n // 10):
            open_device().close()
        return (time.perf_counter() - start) / (n // 10)

    results["open+close device"] = _best_of(3, open_close)

    dev = open_device()
    counter = [0]

    def create_close() -> float:
        base = counter[0]
        counter[0] += n
        start = time.perf_counter()
        for i in range(base, base + n):
            dev.create_session(f"{prefix}c{i}").close()
        return (time.perf_counter() - start) / n

    results["create+close session"] = _best_of(3, create_close)

    session = dev.create_session(f"{prefix}main")
    dev.close()

    def get_name() -> float:
        start = time.perf_counter()
        for _ in range(n):
            session.name
        return (time.perf_counter() - start) / n

    results["get_name"] = _best_of(3, get_name)

    start = time.perf_counter()
    for token, fd in enumerate(memfds):
        session.preserve(fd, token)
    results["preserve"] = (time.perf_counter() - start) / n

    start = time.perf_counter()
    kexec()
    results["kexec (n files)"] = time.perf_counter() - start
    session.close()

    dev = open_device()
    incoming = dev.retrieve_session(f"{prefix}main")
    dev.close()
    start = time.perf_counter()
    got: List[int] = []
    for token in range(n):
        got.append(incoming.retrieve(token))
    results["retrieve"] = (time.perf_counter() - start) / n
    incoming.finish()
    incoming.close()
    for fd in got + memfds:
        os.close(fd)
    return results


#: The other client: round trips until its stdin closes (two threads, so that
#: a status request is not held up behind a session ioctl), then every sample
#: (start on CLOCK_MONOTONIC, which all processes share, and duration) as JSON.
_PROBE = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[2])
import liveupdate
from liveupdate.service import client
path = sys.argv[1]
with liveupdate.open(emulator=path, timeout=600) as dev:
    session = dev.create_session("probe")
samples = {"get_name": [], "status": []}
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
def loop(kind, call):
    while not stop.is_set():
        start = time.monotonic()
        call()
        samples[kind].append((start, time.monotonic() - start))
        time.sleep(0.002)
threads = [threading.Thread(target=loop, args=("get_name", lambda: session.name)),
           threading.Thread(target=loop, args=("status", lambda: client.status(path, 600)))]
for thread in threads:
    thread.start()
print("ready", flush=True)
for thread in threads:
    thread.join()
session.close()
print(json.dumps(samples), flush=True)
"""


def _rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _stats(samples: List[Tuple[float, float]], start: float, end: float) -> Tuple[float, float, float, int]:
    """(median, 99th percentile, worst, count) of the round trips that began in [start, end)."""
    inside = sorted(duration for began, duration in samples if start <= began < end)
    if not inside:
        return float("nan"), float("nan"), float("nan"), 0
    return inside[len(inside) // 2], inside[min(len(inside) - 1, int(len(inside) * 0.99))], inside[-1], len(inside)


def measure_large(gib: int, count: int, idle_seconds: float = 1.0) -> None:
    """The large-memfd section (see the module doc)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    size = gib << 30
    with tempfile.TemporaryDirectory(prefix="luo-bench-large-") as directory:
        with testing.ServiceProcess(directory) as service:
            probe = subprocess.Popen([sys.executable, "-c", _PROBE, service.socket, root], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            assert probe.stdout is not None and probe.stdin is not None
            if probe.stdout.readline().strip() != "ready":
                raise SystemExit("the probe client did not start")
            rss = {"before": _rss(service.pid)}
            peak = [rss["before"]]
            sampling = threading.Event()

            def watch() -> None:
                while not sampling.wait(0.02):
                    peak[0] = max(peak[0], _rss(service.pid))

            idle_start = time.monotonic()
            time.sleep(idle_seconds)
            idle_end = time.monotonic()
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            sessions = []
            with service.open() as dev:
                for i in range(count):
                    sessions.append(dev.create_session(f"large{i}"))
            fds = []
            busy_start = time.monotonic()
            for i, session in enumerate(sessions):
                fd = os.memfd_create(f"large{i}")
                os.ftruncate(fd, size)
                session.preserve(fd, 1)
                fds.append(fd)
            busy_end = time.monotonic()
            sampling.set()
            watcher.join()
            rss["peak during"] = max(peak[0], _rss(service.pid))
            rss["after preserve"] = _rss(service.pid)
            for session in sessions:
                session.close()
            for fd in fds:
                os.close(fd)
            service.status()  # the service has seen the closes once it answers this
            rss["after close"] = _rss(service.pid)
            probe.stdin.close()
            samples = json.loads(probe.stdout.readline())
            probe.wait(60)
    print(f"\n{count} sparse memfds of {gib} GiB preserved through the service in "
          f"{busy_end - busy_start:.2f} s; another client's round trips meanwhile:")
    print(f"{'request':<10}{'window':<10}{'n':>6}{'median':>12}{'p99':>12}{'worst':>12}")
    for kind, rows in samples.items():
        idle = _stats(rows, idle_start, idle_end)
        busy = _stats(rows, busy_start, busy_end)
        for label, st in (("idle", idle), ("preserve", busy)):
            print(f"{kind:<10}{label:<10}{st[3]:>6}{st[0] * 1e3:>9.2f} ms{st[1] * 1e3:>9.2f} ms{st[2] * 1e3:>9.2f} ms")
        print(f"{kind:<10}{'ratio':<10}{'':>6}{busy[0] / idle[0]:>11.1f}x{busy[1] / idle[1]:>11.1f}x"
              f"{busy[2] / idle[2]:>11.1f}x")
    print("service RSS: " + ", ".join(f"{label} {value / (1 << 20):.0f} MiB" for label, value in rss.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="operations per measurement (default 2000)")
    parser.add_argument("--large", action="store_true",
                        help="also run the large-memfd section (another client's latency, the service's RSS)")
    parser.add_argument("--large-only", action="store_true", help="run only the large-memfd section")
    parser.add_argument("--large-gib", type=int, default=4, help="apparent size of each large memfd (default 4)")
    parser.add_argument("--large-count", type=int, default=3, help="how many large memfds (default 3)")
    args = parser.parse_args()
    if not args.large_only:
        calls(args.n)
    if args.large or args.large_only:
        measure_large(args.large_gib, args.large_count)
    return 0


def calls(n: int) -> None:
    """The per-call section: each operation in-process and through the service."""
    from liveupdate.emulator import Emulator

    emu = Emulator()
    local = measure(lambda: emu.open(), emu.kexec, n, "l")

    with tempfile.TemporaryDirectory(prefix="luo-bench-") as directory:
        with testing.ServiceProcess(directory) as service:
            remote = measure(lambda: service.open(), lambda: service.kexec() and None, n, "s")

    rows: List[Tuple[str, float, float]] = [(op, local[op], remote[op]) for op in local]
    print(f"{'operation':<24}{'in-process':>14}{'service':>14}{'ratio':>9}")
    for op, here, there in rows:
        unit, scale = ("ms", 1e3) if op.startswith("kexec") else ("us", 1e6)
        print(f"{op:<24}{here * scale:>11.1f} {unit}{there * scale:>11.1f} {unit}{there / here:>8.1f}x")
    per_call = [there / here for op, here, there in rows if not op.startswith("kexec")]
    geo = 1.0
    for ratio in per_call:
        geo *= ratio
    geo **= 1 / len(per_call)
    print(f"n={n}; service / in-process, geometric mean over per-call operations: {geo:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
