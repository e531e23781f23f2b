"""Compare device and emulator outcomes; shrink a mismatch to a reproducer.

:func:`compare` pairs the records of the two backends by (trace, op index).
For the first mismatch of a trace, :func:`reproducer` prints the seed, the
diverging operation with both outcomes, and a shrunk trace:

1. *slice*: the operations that touch the same objects as the diverging
   one, transitively (object ids, and session names, which link a create
   before the kexec to a retrieve after it), plus the kexec;
2. *delta debugging on the emulator*: drop operations from the slice while
   the emulator, re-run on the smaller trace, still gives every kept
   operation the outcome it had in the full run (so the device's recorded
   outcomes still apply to them) -- cheap, thousands of emulator runs a
   second;
3. optionally (``confirm``, one more VM boot) the shrunk trace on the
   device, to show it still diverges on its own.

The traces are independent (per-trace name prefixes), so a trace runs
alone, on a fresh emulator, exactly as it ran among the others.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import runner, trace

Key = Tuple[int, int]

__all__ = ["compare", "slice_ops", "shrink", "reproducer", "subtrace"]


def by_key(records: Iterable[Dict[str, Any]]) -> Dict[Key, Dict[str, Any]]:
    return {(r["trace"], r["i"]): r for r in records}


# The one difference the comparison forgives, because no user-space
# emulator can remove it: the kernel makes a retrieved memfd with
# memfd_alloc_file("") and its /proc link reads "/ (deleted)"; a host memfd
# is always "memfd:NAME" (memfd_create adds the prefix). Contents, size,
# position, seals, flags and identity are still compared. Reported in
# /tmp/emu_bugs.md (entry 5); the count is printed with every run.
_KERNEL_MEMFD_LINK = "/ (deleted)"
_HOST_MEMFD_LINK = re.compile(r"^/memfd:.* \(deleted\)$")


def _forgive_memfd_name(device_out: Any, emulator_out: Any) -> bool:
    """True if the two outcomes differ only in that memfd link."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k == "link" and isinstance(v, str) and (v == _KERNEL_MEMFD_LINK or _HOST_MEMFD_LINK.match(v)):
                    out[k] = "<memfd>"
                else:
                    out[k] = strip(v)
            return out
        return x
    return strip(device_out) == strip(emulator_out) and _only_new_files(device_out)


def _only_new_files(out: Any) -> bool:
    # The kernel's empty name may only show on files it made itself (a
    # retrieved memfd); a trace's own memfds are named the same on both.
    text = json.dumps(out)
    return _KERNEL_MEMFD_LINK in text


def compare(device: List[Dict[str, Any]], emulator: List[Dict[str, Any]],
            forgiven: Optional[List[Key]] = None) -> Tuple[int, List[Key]]:
    """(operations compared, keys whose outcomes differ, in trace order).
    An operation recorded by only one side counts as a mismatch. Outcomes
    that differ only in a retrieved memfd's /proc name are not mismatches;
    their keys go to ``forgiven`` when given."""
    d, e = by_key(device), by_key(emulator)
    keys = sorted(set(d) | set(e))
    bad = []
    for k in keys:
        dev_out, emu_out = d.get(k, {}).get("out"), e.get(k, {}).get("out")
        if dev_out == emu_out:
            continue
        if k in d and k in e and _forgive_memfd_name(dev_out, emu_out):
            if forgiven is not None:
                forgiven.append(k)
            continue
        bad.append(k)
    return len(keys), bad


def file_aliases(ops: Sequence[Dict[str, Any]], records: Optional[Dict[Key, Dict[str, Any]]],
                 trace_no: int) -> Dict[str, str]:
    """file id -> the id of the first file of its stage with the same inode
    (what the records observed as ``same_as``): fds of one file link the
    operations on it even when no operation names two of them."""
    alias: Dict[str, str] = {}
    for (no, i), rec in (records or {}).items():
        if no != trace_no or i >= len(ops) or "f" not in ops[i]:
            continue
        observed = (rec.get("out") or {}).get("file")
        if isinstance(observed, dict) and isinstance(observed.get("same_as"), str):
            alias[ops[i]["f"]] = observed["same_as"]
    return alias


def slice_ops(ops: Sequence[Dict[str, Any]], target: int,
              alias: Optional[Dict[str, str]] = None) -> List[int]:
    """Indices of the operations before ``target`` that share objects with
    it, transitively (``alias`` joins fds of the same file), plus the kexec
    and ``target`` itself."""
    # Device handles do not link operations: every create goes through one,
    # so following them would keep everything. The device's opens and
    # closes are all kept instead (whether an open is refused with EBUSY
    # depends on all of them).
    alias = alias or {}

    def links(op: Dict[str, Any]) -> set:
        refs = {r for r in trace.op_refs(op) if not r.startswith("d")}
        return refs | {"file:" + alias[r] for r in refs if r in alias}

    wanted = links(ops[target])
    keep = {target} | {i for i in range(target) if ops[i]["op"] in ("open", "close_dev")}
    changed = True
    while changed:
        changed = False
        for i in range(target - 1, -1, -1):
            if i in keep:
                continue
            refs = links(ops[i])
            if refs & wanted:
                keep.add(i)
                wanted |= refs
                changed = True
    k = runner.kexec_index(list(ops))
    if k < target:
        keep.add(k)
    return sorted(keep)


def subtrace(ops: Sequence[Dict[str, Any]], indices: Sequence[int]) -> List[Dict[str, Any]]:
    return [ops[i] for i in indices]


def _emulate(ops: List[Dict[str, Any]], trace_no: int) -> List[Dict[str, Any]]:
    return runner.run_emulator([ops], [trace_no])


def shrink(ops: Sequence[Dict[str, Any]], trace_no: int, target: int,
           reference: Optional[Dict[Key, Dict[str, Any]]] = None, budget: int = 600,
           device: Optional[Dict[Key, Dict[str, Any]]] = None) -> List[int]:
    """Delta-debug ``ops`` (one trace) down to a small list of indices that
    keeps ``target`` and whose emulator outcomes equal ``reference`` (the
    emulator's outcomes in the full run; computed here when None) for every
    kept op. Starts from the object slice. At most ``budget`` emulator runs."""
    if reference is None:
        reference = by_key(_emulate(list(ops), trace_no))
    k = runner.kexec_index(list(ops))
    runs = [0]

    def holds(indices: List[int]) -> bool:
        runs[0] += 1
        recs = _emulate(subtrace(ops, indices), trace_no)
        if len(recs) != len(indices):
            return False
        return all(rec["out"] == reference.get((trace_no, i), {}).get("out") for rec, i in zip(recs, indices))

    # Identity as the device saw it: the emulator cannot tell which ops
    # matter to the device, so every op on the target's file (through any
    # of its fds) stays, and only the rest is shrunk.
    alias = file_aliases(ops, device if device is not None else reference, trace_no)
    current = slice_ops(ops, target, alias)
    def objects(op: Dict[str, Any]) -> set:
        return {"file:" + alias.get(r, r) for r in trace.op_refs(op) if not r.startswith("d")}

    target_objects = objects(ops[target])
    same_file = {i for i in current if objects(ops[i]) & target_objects}
    if not holds(current):
        current = list(range(target + 1))  # the slice changed the story: start from the prefix
        if not holds(current):
            return current
    fixed = {target} | ({k} if k < target else set()) | same_file
    # Delta debugging with halving chunk sizes, each chunk tried once per
    # size, from the end backwards (later ops depend on earlier ones, so
    # they go first): about 2 runs per op, down to single ops at the end.
    size = 1
    while size * 2 <= len(current):
        size *= 2
    while size >= 1 and runs[0] < budget:
        movable = [i for i in current if i not in fixed]
        for end in range(len(movable), 0, -size):
            drop = set(movable[max(0, end - size):end])
            candidate = [i for i in current if i not in drop]
            if holds(candidate):
                current = candidate
            if runs[0] >= budget:
                break
        size //= 2
    return current


def _show(out: Any) -> str:
    return json.dumps(out, sort_keys=True)


def reproducer(entry: Dict[str, Any], key: Key, device: Dict[Key, Dict[str, Any]],
               emulator: Dict[Key, Dict[str, Any]], shrunk: Optional[List[int]] = None,
               confirm: Optional[Callable[[List[Dict[str, Any]]], str]] = None) -> str:
    """Text for one mismatch: where, both outcomes, the shrunk trace with
    the device's and the emulator's outcome of each kept op, and how to
    replay it."""
    ops = entry["ops"]
    trace_no, target = key
    lines = [
        "MISMATCH in trace %d (seed %d), op %d: %s" % (trace_no, entry["seed"], target, _show(ops[target])),
        "  device  : %s" % _show(device.get(key, {}).get("out", "(not run)")),
        "  emulator: %s" % _show(emulator.get(key, {}).get("out", "(not run)")),
    ]
    sliced = slice_ops(ops, target, file_aliases(ops, device, trace_no))
    if shrunk is None:
        shrunk = sliced
    lines.append("  ops touching the same objects: %d of %d; shrunk on the emulator to %d:"
                 % (len(sliced), target + 1, len(shrunk)))
    for i in shrunk:
        dev_out = device.get((trace_no, i), {}).get("out")
        emu_out = emulator.get((trace_no, i), {}).get("out")
        mark = "  " if dev_out == emu_out else "!!"
        lines.append("  %s [%3d] %s" % (mark, i, _show(ops[i])))
        lines.append("         device: %s" % _show(dev_out))
        if dev_out != emu_out:
            lines.append("         emulator: %s" % _show(emu_out))
    lines.append("  replay on the emulator: python3 tests/differential/repro.py --seed %d --trace %d --ops %s"
                 % (entry["seed"], trace_no, ",".join(map(str, shrunk))))
    lines.append("  replay on the device too: add --vm")
    if confirm is not None:
        lines.append("  on the device alone: " + confirm(subtrace(ops, shrunk)))
    return "\n".join(lines)
