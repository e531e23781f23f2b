#!/usr/bin/env python3
"""Per-operation cost of the emulator at 1,000 and at 100,000 of a kind.

Two workloads, each run at a small and a large size in the same process:

* sessions: create N sessions, kexec, retrieve the N sessions;
* files: preserve N memfds in one session, kexec, retrieve the N files.

For every operation it prints the cost per operation at both sizes and the
ratio large/small, which should stay at or below 1.2 (the emulator must not
be quadratic where the kernel's own token check is). kexec is reported per
session or per file it carries. The small size is run several times and
its median taken, so that it is a steady baseline; the large size runs once.
Costs are CPU time of this process (shared machines make wall time noisy).

The large sizes need far more fds than the usual limit (each emulated
session handle is a pipe, and the emulator keeps its own reference to every
preserved or retrieved file), so the script raises RLIMIT_NOFILE for itself
and says so. Default run: about a minute or two on a 2-core machine.

    python tools/bench_emulator.py                 # 1,000 vs 100,000
    python tools/bench_emulator.py --large 20000   # quicker
    python tools/bench_emulator.py --memfd         # only the large-memfd section

A third section, large memfds (VM memory): one sparse memfd (ftruncate,
never written) of 1 GiB and of 16 GiB, each in a fresh child process,
preserved in an in-process Emulator, kexec'd, retrieved and finished, then
the same through an image file (kexec(image=), Emulator.from_image, a
retrieve that copies). It prints each step's wall time, the per-GiB cost at
both sizes and their ratio (target <= 1.2), the 16 GiB cycle's time (target:
a few seconds) and peak RSS growth (target <= 128 MiB), and the resident
memory after finish against the start. Wall time here, not CPU time: a
sparse memfd's cost is mostly the host kernel's (page tables, copies).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import errno
import gc
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liveupdate.emulator import Emulator  # noqa: E402

TARGET = 1.2
Costs = Dict[str, float]


# CPU time of this process (user + system), not wall time: the machines
# this runs on are often shared, and the emulator never waits for anything.
clock = time.process_time


COLLECT = True


def timed(fn: Callable[[], None]) -> float:
    gc.collect()
    if not COLLECT:
        gc.disable()
    try:
        start = clock()
        fn()
        return clock() - start
    finally:
        gc.enable()


def bench_sessions(n: int) -> Costs:
    emu = Emulator()
    dev = emu.open()
    names = [f"bench-session-{i}" for i in range(n)]
    handles: List = []

    def create() -> None:
        add = handles.append
        make = dev.create_session
        for name in names:
            add(make(name))

    t_create = timed(create)
    dev.close()
    t_kexec = timed(emu.kexec)
    for h in handles:
        h.close()  # stale handles of the old kernel: only their fds go
    handles.clear()
    dev = emu.open()

    def retrieve() -> None:
        add = handles.append
        get = dev.retrieve_session
        for name in names:
            add(get(name))

    t_retrieve = timed(retrieve)
    for h in handles:
        h.close()
    dev.close()
    return {"create_session": t_create / n, "kexec per session": t_kexec / n, "retrieve_session": t_retrieve / n}


def bench_files(n: int) -> Costs:
    emu = Emulator()
    dev = emu.open()
    session = dev.create_session("bench-files")
    t_preserve = 0.0
    gc.collect()
    if not COLLECT:
        gc.disable()
    for token in range(n):
        # Only the preserve call is timed; our own fd is closed at once so
        # that the emulator's references are the only fds that pile up.
        fd = os.memfd_create("bench")
        os.write(fd, b"%d" % token)
        start = clock()
        session.preserve(fd, token)
        t_preserve += clock() - start
        os.close(fd)
    gc.enable()
    dev.close()
    t_kexec = timed(emu.kexec)
    session.close()
    dev = emu.open()
    incoming = dev.retrieve_session("bench-files")
    t_retrieve = 0.0
    gc.collect()
    if not COLLECT:
        gc.disable()
    for token in range(n):
        start = clock()
        fd = incoming.retrieve(token)
        t_retrieve += clock() - start
        os.close(fd)
    gc.enable()
    incoming.finish()
    incoming.close()
    dev.close()
    return {"preserve": t_preserve / n, "kexec per file": t_kexec / n, "retrieve (fd)": t_retrieve / n}


def bench_kernel_sessions(n: int) -> Costs:
    """Sessions through the emulated kernel's own entry points (what the
    ioctls call), without the handles' fds: the only way to reach 100,000
    sessions where RLIMIT_NOFILE cannot be raised."""
    emu = Emulator()
    sessions = emu.kernel.sessions
    # NUL-terminated name fields, as the ioctl structs carry them.
    names = [b"bench-session-%d\0" % i for i in range(n)]

    def create() -> None:
        make = sessions.create
        for name in names:
            make(name)

    t_create = timed(create)
    t_kexec = timed(emu.kexec)
    emu.kernel.open()
    sessions = emu.kernel.sessions

    def retrieve() -> None:
        get = sessions.retrieve
        for name in names:
            get(name)

    t_retrieve = timed(retrieve)
    return {"create (kernel entry)": t_create / n, "kexec per session (kernel entry)": t_kexec / n,
            "retrieve (kernel entry)": t_retrieve / n}


def fds_needed(n: int) -> int:
    # Sessions: each emulated handle is a pipe (2 fds) while it is open;
    # the old kernel's handles are closed before the new ones are made.
    return 2 * n + 1000


def raise_nofile(large: int) -> int:
    """Raise RLIMIT_NOFILE for ``large`` session handles; returns how many
    the limit allows if it cannot be raised that far (and says so)."""
    want = fds_needed(large)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return large
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError) as exc:
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        fits = max(1000, (hard - 1000) // 2 // 1000 * 1000)
        print(f"bench_emulator: {large:,} session handles need RLIMIT_NOFILE >= {want:,}; it cannot be raised past "
              f"its hard limit {hard:,} here ({exc}). Soft limit raised from {soft:,} to {hard:,}.")
        return fits
    print(f"bench_emulator: raised RLIMIT_NOFILE from {soft:,} to {want:,} for {large:,} sessions")
    return large


def largest_that_runs(bench: Callable[[int], Costs], n: int, floor: int) -> "tuple[int, Costs]":
    """Run ``bench(n)``; if the process runs out of fds (EMFILE), halve n
    (not below ``floor``) and try again."""
    while True:
        try:
            return n, bench(n)
        except OSError as exc:
            if exc.errno != errno.EMFILE or n // 2 < floor:
                raise
            print(f"bench_emulator: {bench.__name__} at {n:,} ran out of fds (EMFILE); trying {n // 2:,}")
            n //= 2
            gc.collect()


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:9.2f} us"


MEMFD_TARGET_RATIO = 1.2
MEMFD_TARGET_RSS_MIB = 128
GIB = 1 << 30


def _rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as src:
        return int(src.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memfd_cycle(gib: int, image_dir: str) -> Dict[str, float]:
    """One sparse memfd of ``gib`` GiB through preserve, kexec, retrieve and
    finish in process, then through an image file. Runs in a fresh child
    (peak RSS is per process); returns seconds per step and bytes of RSS."""
    gc.collect()
    start_rss = _rss()
    out: Dict[str, float] = {}
    wall = time.perf_counter

    def step(name: str, fn: Callable[[], object]) -> object:
        t = wall()
        result = fn()
        out[name] = wall() - t
        return result

    emu = Emulator()
    dev = emu.open()
    session = dev.create_session("vm-memory")
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, gib * GIB)
    step("preserve", lambda: session.preserve(fd, 1))
    os.close(fd)
    dev.close()
    step("kexec", emu.kexec)
    session.close()
    dev = emu.open()
    incoming = dev.retrieve_session("vm-memory")
    new = step("retrieve", lambda: incoming.retrieve(1))
    step("finish", incoming.finish)
    assert os.fstat(new).st_size == gib * GIB  # type: ignore[arg-type]
    os.close(new)  # type: ignore[arg-type]
    incoming.close()
    dev.close()
    gc.collect()
    out["cycle"] = out["preserve"] + out["kexec"] + out["retrieve"] + out["finish"]
    out["peak_rss_growth"] = _peak_rss() - start_rss
    out["rss_after_finish"] = _rss() - start_rss
    # Through an image: the kexec writes it, a new emulator boots from it
    # and the retrieve copies the pages into a new memfd.
    path = os.path.join(image_dir, f"bench-{gib}g.img")
    dev = emu.open()
    session = dev.create_session("vm-memory")
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, gib * GIB)
    os.pwrite(fd, b"guest", 0)
    session.preserve(fd, 1)
    os.close(fd)
    dev.close()
    step("kexec(image=)", lambda: emu.kexec(image=path))
    out["image_bytes"] = os.path.getsize(path)
    booted = step("from_image", lambda: Emulator.from_image(path))
    dev = booted.open()  # type: ignore[attr-defined]
    incoming = dev.retrieve_session("vm-memory")
    new = step("retrieve (copy)", lambda: incoming.retrieve(1))
    step("finish (image)", incoming.finish)
    assert os.pread(new, 5, 0) == b"guest" and os.fstat(new).st_size == gib * GIB  # type: ignore[arg-type]
    os.close(new)  # type: ignore[arg-type]
    incoming.close()
    dev.close()
    os.unlink(path)
    out["image_cycle"] = out["kexec(image=)"] + out["from_image"] + out["retrieve (copy)"] + out["finish (image)"]
    return out


def run_memfd_child(gib: int, image_dir: str) -> Dict[str, float]:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memfd-child", str(gib), image_dir],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"bench_emulator: the {gib} GiB child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memfd(small: int, large: int, image_dir: str) -> bool:
    """The large-memfd section; True when every target is met."""
    runs = {gib: run_memfd_child(gib, image_dir) for gib in (small, large)}
    steps = ["preserve", "kexec", "retrieve", "finish", "cycle", "kexec(image=)", "from_image", "retrieve (copy)",
             "finish (image)", "image_cycle"]
    print(f"\nlarge sparse memfd, {small} GiB vs {large} GiB (wall time, fresh process each)")
    print(f"{'step':<18} {small:>4} GiB {'per GiB':>10} {large:>5} GiB {'per GiB':>10} {'ratio':>6}")
    worst = 0.0
    for name in steps:
        a, b = runs[small][name], runs[large][name]
        pa, pb = a / small, b / large
        ratio = pb / pa if pa > 0 else float("inf")
        if name in ("cycle", "image_cycle"):
            worst = max(worst, ratio)
        print(f"{name:<18} {a:8.3f} s {pa * 1e3:7.1f} ms {b:8.3f} s {pb * 1e3:7.1f} ms {ratio:6.2f}")
    big = runs[large]
    mib = 1 << 20
    print(f"image of {large} GiB: {big['image_bytes'] / mib:.1f} MiB on disk")
    print(f"{large} GiB cycle: {big['cycle']:.2f} s; through an image: {big['image_cycle']:.2f} s")
    print(f"{large} GiB peak RSS growth: {big['peak_rss_growth'] / mib:.1f} MiB (target <= {MEMFD_TARGET_RSS_MIB}); "
          f"after finish: {big['rss_after_finish'] / mib:+.1f} MiB against the start")
    ok = worst <= MEMFD_TARGET_RATIO and big["peak_rss_growth"] <= MEMFD_TARGET_RSS_MIB * mib
    print(f"worst per-GiB ratio {worst:.2f} (target <= {MEMFD_TARGET_RATIO}): {'ok' if ok else 'TOO HIGH'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1_000, help="baseline size (default 1,000)")
    parser.add_argument("--large", type=int, default=100_000, help="large size (default 100,000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the small size; the median is used")
    parser.add_argument("--no-gc", action="store_true",
                        help="disable Python's cyclic garbage collector while timing (shows its share of the growth)")
    parser.add_argument("--memfd", action="store_true", help="run only the large-memfd section")
    parser.add_argument("--no-memfd", action="store_true", help="skip the large-memfd section")
    parser.add_argument("--memfd-gib", type=int, nargs=2, default=(1, 16), metavar=("SMALL", "LARGE"),
                        help="memfd sizes in GiB (default 1 16)")
    parser.add_argument("--image-dir", default=os.environ.get("TMPDIR", "/tmp"),
                        help="where the image cycle writes its image (default $TMPDIR or /tmp)")
    parser.add_argument("--memfd-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memfd_child:
        print(json.dumps(memfd_cycle(int(args.memfd_child[0]), args.memfd_child[1])))
        return 0
    if args.memfd:
        return 0 if bench_memfd(args.memfd_gib[0], args.memfd_gib[1], args.image_dir) else 1
    global COLLECT
    COLLECT = not args.no_gc
    sessions_large = raise_nofile(args.large)

    rows: Dict[str, "tuple[int, float, int, float]"] = {}
    for bench, large_n in ((bench_sessions, sessions_large), (bench_files, args.large),
                           (bench_kernel_sessions, args.large)):
        bench(min(args.small, 200))  # warm up: imports, first-use caches
        small_runs = [bench(args.small) for _ in range(args.repeat)]
        ran, large = largest_that_runs(bench, large_n, args.small)
        if ran < args.large:
            print(f"bench_emulator: {bench.__name__} measured at {ran:,} instead of {args.large:,} (fd limit)")
        for op in large:
            rows[op] = (args.small, statistics.median(run[op] for run in small_runs), ran, large[op])

    print(f"{'operation':<34} {'small':>8} {'per op':>12} {'large':>8} {'per op':>12} {'ratio':>6}")
    worst = 0.0
    for op, (small_n, small, large_n, large) in rows.items():
        ratio = large / small
        worst = max(worst, ratio)
        print(f"{op:<34} {small_n:>8,} {fmt(small):>12} {large_n:>8,} {fmt(large):>12} {ratio:6.2f}")
    verdict = "ok" if worst <= TARGET else "TOO HIGH"
    print(f"worst large/small ratio: {worst:.2f} (target <= {TARGET}): {verdict}")
    if not args.no_memfd:
        bench_memfd(args.memfd_gib[0], args.memfd_gib[1], args.image_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
