"""Differential test: the real kernel and the emulator give the same answers.

Seeded random traces (:mod:`.trace`) of creates, retrieves, preserves,
file retrieves, finishes, get-names and closes -- valid and invalid, raw
ioctls with bad sizes and reserved fields, memfds of varied contents,
sizes, positions and seals, and one kexec each -- run on the real
``/dev/liveupdate`` in QEMU (one boot, one real kexec for all traces) and on
the emulator in the same guest kernel. Every outcome must be identical:
errno or result, returned struct bytes, and for every file the kernel hands
back its contents, size, position, seals, flags, close-on-exec and
identity.

Seeds: :data:`.trace.FIXED_SEEDS` every run, plus one fresh seed printed in
the summary (``LIVEUPDATE_DIFF_SEED=N`` replays it). A mismatch prints a
shrunk reproducer (:mod:`.compare`) and, unless
``LIVEUPDATE_DIFF_CONFIRM=0``, re-runs the shrunk traces on the device in
one more boot.
"""
from __future__ import annotations

import collections
import os
import secrets
import time
from typing import Any, Dict, List

import pytest

from . import compare, runner, trace, vmdrive

MIN_OPS = 5000


def fresh_seed() -> int:
    env = os.environ.get("LIVEUPDATE_DIFF_SEED")
    return int(env) if env else secrets.randbelow(2**31) + 1000


FRESH_SEED = fresh_seed()


def entries() -> List[Dict[str, Any]]:
    seeds = list(trace.FIXED_SEEDS) + [FRESH_SEED]
    return [{"no": k, "seed": s, "ops": trace.generate(s, k)} for k, s in enumerate(seeds)]


def outcome_kinds(records: List[Dict[str, Any]]) -> "collections.Counter[str]":
    kinds: "collections.Counter[str]" = collections.Counter()
    for rec in records:
        out = rec["out"]
        kinds[rec["op"] + ":" + ("ok" if out.get("ok") else out.get("err") or out.get("exc") or "missing")] += 1
    return kinds


def test_emulator_replays_a_trace_identically() -> None:
    """The runner is deterministic: the comparison means something only if
    one backend run twice gives the same record, fds, inodes and pids aside."""
    chosen = [e for e in entries() if e["no"] in (0, 1)] + [entries()[-1]]
    traces = [e["ops"] for e in chosen]
    numbers = [e["no"] for e in chosen]
    first = runner.run_emulator(traces, numbers)
    second = runner.run_emulator(traces, numbers)
    assert first == second
    assert len(first) == sum(len(t) for t in traces)
    kinds = outcome_kinds(first)
    # The traces reach the interesting paths, not only early refusals.
    for needed in ("create:ok", "preserve:ok", "retrieve_session:ok", "retrieve:ok", "finish:ok",
                   "create:EEXIST", "preserve:EBUSY", "retrieve:ENOENT"):
        assert kinds[needed] > 0, (needed, sorted(kinds.items()))


def test_shrinker_keeps_the_outcome_it_explains() -> None:
    """The shrinker's own contract, on the emulator alone: the shrunk trace
    is a sub-list that keeps the target and reproduces the full run's
    emulator outcome of every op it keeps."""
    for seed in trace.FIXED_SEEDS:
        ops = trace.generate(seed, 0)
        full = compare.by_key(runner.run_emulator([ops], [0]))
        # A retrieved file: its outcome depends on ops on both sides of the kexec.
        found = [i for i, op in enumerate(ops) if op["op"] == "retrieve" and full[(0, i)]["out"].get("ok")]
        if found:
            target = found[-1]
            break
    else:
        pytest.fail("no fixed seed retrieves a file")
    kept = compare.shrink(ops, 0, target, full)
    assert target in kept and len(kept) < len(compare.slice_ops(ops, target)) + 1 < len(ops)
    again = runner.run_emulator([compare.subtrace(ops, kept)], [0])
    assert [r["out"] for r in again] == [full[(0, i)]["out"] for i in kept]


@pytest.mark.vm
def test_device_and_emulator_agree(tmp_path, diff_summary) -> None:
    if os.environ.get("LIVEUPDATE_STAGE"):
        pytest.skip("already inside a vmtest guest")
    why = vmdrive.missing_requirement()
    if why:
        if os.environ.get("CI"):
            pytest.fail("CI must run the differential test on the real kernel, but " + why)
        pytest.skip(why)
    work = entries()
    diff_summary("seeds: fixed %d..%d, fresh %d (replay: LIVEUPDATE_DIFF_SEED=%d)"
                 % (trace.FIXED_SEEDS[0], trace.FIXED_SEEDS[-1], FRESH_SEED, FRESH_SEED))
    start = time.monotonic()
    result = vmdrive.run(work, str(tmp_path / "run"))
    wall = time.monotonic() - start
    assert result.returncode == 0, result.explain()
    forgiven: List[Any] = []
    compared, bad = compare.compare(result.device, result.emulator, forgiven)
    diff_summary("%d operations compared in %d traces, %d mismatches; VM wall %.0f s, guest: %s"
                 % (compared, len(work), len(bad), wall,
                    ", ".join("%s %.1f s" % kv for kv in sorted(result.timing.items()))))
    diff_summary("%d outcomes equal but for a retrieved memfd's /proc name (kernel '/ (deleted)', "
                 "emulator 'memfd:...'; no user-space emulator can make the kernel's)" % len(forgiven))
    live = sum(1 for r in result.device if "missing" not in r["out"])
    diff_summary("%d of them acted on live objects (the rest name closed or failed ones on purpose)" % live)
    assert compared >= MIN_OPS and live >= MIN_OPS, "only %d operations ran (%d on live objects)" % (compared, live)
    if not bad:
        return
    report = mismatch_report(work, result, bad, tmp_path)
    (tmp_path / "mismatches.txt").write_text(report)
    diff_summary("reproducers: %s" % (tmp_path / "mismatches.txt"))
    pytest.fail("%d of %d operations differ between the device and the emulator\n%s"
                % (len(bad), compared, report), pytrace=False)


def mismatch_report(work: List[Dict[str, Any]], result: vmdrive.VmResult, bad: List[Any], tmp_path) -> str:
    device, emulator = compare.by_key(result.device), compare.by_key(result.emulator)
    by_no = {e["no"]: e for e in work}
    firsts: Dict[int, Any] = {}
    for key in bad:
        firsts.setdefault(key[0], key)
    chosen = sorted(firsts.values())[:5]
    shrunk: Dict[int, List[int]] = {}
    for trace_no, target in chosen:
        entry = by_no[trace_no]
        # Shrink on the host's emulator only when it tells the same story
        # as the guest's (the host kernel's memfds may differ).
        host = compare.by_key(runner.run_emulator([entry["ops"]], [trace_no]))
        same = all(host.get(k, {}).get("out") == v["out"] for k, v in emulator.items() if k[0] == trace_no)
        if same:
            shrunk[trace_no] = compare.shrink(entry["ops"], trace_no, target, host, device=device)
        else:
            shrunk[trace_no] = compare.slice_ops(entry["ops"], target,
                                                 compare.file_aliases(entry["ops"], device, trace_no))
    confirmations: Dict[int, str] = {}
    if os.environ.get("LIVEUPDATE_DIFF_CONFIRM", "1") != "0":
        subs = [{"no": n, "seed": by_no[n]["seed"], "ops": compare.subtrace(by_no[n]["ops"], idx)}
                for n, idx in shrunk.items()]
        again = vmdrive.run(subs, str(tmp_path / "confirm"), timeout=300)
        if again.returncode != 0:
            confirmations = {n: "the confirming VM run failed (exit %d)" % again.returncode for n in shrunk}
        else:
            for n in shrunk:
                _, still = compare.compare([r for r in again.device if r["trace"] == n],
                                           [r for r in again.emulator if r["trace"] == n])
                confirmations[n] = ("still diverges on its own (%d op(s) differ)" % len(still) if still
                                    else "does NOT diverge on its own: the full trace is the reproducer")
    parts = []
    for trace_no, target in chosen:
        confirm = (lambda _ops, n=trace_no: confirmations[n]) if trace_no in confirmations else None
        parts.append(compare.reproducer(by_no[trace_no], (trace_no, target), device, emulator,
                                        shrunk[trace_no], confirm))
    more = len(bad) - len(chosen)
    if more > 0:
        parts.append("(%d more differing operation(s); device outcomes in %s)" % (more, result.out))
    return "\n\n".join(parts)


def test_mismatch_report_shrinks_and_names_the_seed() -> None:
    """The mismatch path on a made-up disagreement (no VM): pretend the
    device answered one retrieve with ENOENT; the report names the seed and
    the op, shows both outcomes, and shrinks the trace to ops that matter."""
    seed, no = trace.FIXED_SEEDS[1], 1
    ops = trace.generate(seed, no)
    emulated = runner.run_emulator([ops], [no])
    hits = [r["i"] for r in emulated if r["op"] == "retrieve" and r["out"].get("ok")]
    assert hits, "the trace retrieves nothing"
    target = hits[0]
    device = [dict(r, out={"err": "ENOENT"}) if r["i"] == target else r for r in emulated]
    _, bad = compare.compare(device, emulated)
    assert bad == [(no, target)]
    entry = {"no": no, "seed": seed, "ops": ops}
    kept = compare.shrink(ops, no, target, compare.by_key(emulated))
    text = compare.reproducer(entry, (no, target), compare.by_key(device), compare.by_key(emulated), kept)
    assert "seed %d" % seed in text and "op %d" % target in text and '"ENOENT"' in text
    assert "--seed %d --trace %d --ops %s" % (seed, no, ",".join(map(str, kept))) in text
    # The shrunk trace keeps the kexec and the preserve behind the retrieved file.
    kept_ops = [ops[i]["op"] for i in kept]
    assert "kexec" in kept_ops and any(op.startswith("preserve") for op in kept_ops)
    assert len(kept) < target
