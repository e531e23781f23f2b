"""Seeded random traces of Live Update operations (the differential test's input).

A trace is a list of operations, each a JSON-able dict with an ``"op"`` key
and arguments. Objects are named, not numbered: ``d<N>`` a device handle,
``s<N>`` a session, ``f<N>`` a file descriptor the trace opened or got back.
The runner (:mod:`.runner`) maps names to whatever the backend handed out,
so the same trace means the same thing on the real device and on the
emulator, and the recorded outcomes can be compared line by line.

Every trace has exactly one ``{"op": "kexec"}``: before it the trace
creates sessions and preserves files (and tries everything that should
fail), after it the trace retrieves what it can by name and token. Objects
do not cross the kexec (a real kexec ends the process); names and tokens do.

Session names carry a per-trace prefix (``t<K>-``) so that many traces can
share one kernel (one VM boot, one kexec) without seeing each other's
sessions; any one trace can also run alone (the shrinker does).

The generator keeps a rough model of the state (which files may be
preserved, which sessions are incoming) only to produce meaningful
operations; it never predicts outcomes, which come from the backends.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

__all__ = ["generate", "FIXED_SEEDS", "OPS_PER_TRACE", "TOKENS", "op_refs"]

#: The seeds every run replays (with one fresh seed besides).
FIXED_SEEDS = tuple(range(1, 23))
#: Operations per trace: 23 traces of 270 make over 6,000 per run, over
#: 5,000 of them on live objects (the rest name closed or failed ones on purpose).
OPS_PER_TRACE = 270

# Tokens repeat on purpose (EEXIST, retrieve twice); the extremes check
# that all 64 bits survive the handover.
TOKENS = (0, 1, 2, 3, 42, 2**63, 2**64 - 1)

# memfd_create flags.
MFD_CLOEXEC = 0x1
MFD_ALLOW_SEALING = 0x2
MFD_NOEXEC_SEAL = 0x8
MFD_EXEC = 0x10
# fcntl seals.
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20)
SEALS = (F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE, F_SEAL_EXEC)

# Sizes around page boundaries, and a few larger ones.
SIZES = (0, 1, 100, 4095, 4096, 4097, 8192, 12288 + 17, 65536, 200000)
# Kinds of fds that are not memfds (or not preservable ones); see runner.
OTHER_KINDS = ("pipe", "devnull", "socket", "procfile", "dir", "shm_tmpfile", "shm_linked",
               "hugetlb_memfd")
# Bad fd numbers: never open (-1, a number above any limit, the int max).
BAD_FDS = (-1, 999999, 2**31 - 1)

# Raw ioctl numbers: (target kind, what) pairs the runner turns into
# command numbers that the kernel must refuse.
BAD_CMDS = ("nr_low", "nr_high", "dir_bits", "other_type", "session_cmd_on_device",
            "device_cmd_on_session")


class _Gen:
    def __init__(self, seed: int, trace_no: int, n_ops: int) -> None:
        self.rng = random.Random(seed)
        self.prefix = "t%d-" % trace_no
        self.n_ops = n_ops
        self.ops: List[Dict[str, Any]] = []
        self.counter = {"d": 0, "s": 0, "f": 0}
        self.carried: List[str] = []
        self.retrieved: set = set()
        self.size_ok = True
        self.raw_name: Optional[str] = None
        self.carried_tokens: Dict[str, List[int]] = {}
        self.reset_objects()
        # Names that may exist as outgoing sessions at the kexec.
        long_suffix = "L" * (63 - len(self.prefix))
        self.names = [self.prefix + s for s in ("a", "b", "c", "d", "\u00e9t\u00e9", "sp ace", long_suffix)]

    def reset_objects(self) -> None:
        self.devs: List[str] = []
        self.session_names: Dict[str, str] = {}  # id -> name (valid names only)
        self.tokens: Dict[str, List[int]] = {}  # session name -> tokens tried in preserve
        self.sessions: Dict[str, str] = {}  # id -> "out" | "in"
        self.files: Dict[str, Dict[str, Any]] = {}  # id -> {"group": g, "memfd": bool}
        self.frozen_groups: set = set()  # groups of files that may be preserved
        self.group_counter = 0

    def new(self, kind: str) -> str:
        name = "%s%d" % (kind, self.counter[kind])
        self.counter[kind] += 1
        return name

    def emit(self, op: str, **args: Any) -> Dict[str, Any]:
        d = {"op": op}
        d.update(args)
        self.ops.append(d)
        return d

    # -- choosers ------------------------------------------------------------
    def pick(self, seq: Any) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def dev(self) -> str:
        if not self.devs and self.rng.random() < 0.9:
            self.op_open()  # mostly work with an open device, as programs do
        if self.devs and self.rng.random() < 0.95:
            return self.pick(self.devs)
        return "d%d" % self.rng.randrange(max(1, self.counter["d"]) + 1)  # maybe closed/unknown

    def session(self, want: Optional[str] = None) -> Optional[str]:
        pool = [s for s, kind in self.sessions.items() if want is None or kind == want]
        if pool and self.rng.random() < 0.95:
            return self.pick(pool)
        if self.counter["s"]:
            return "s%d" % self.rng.randrange(self.counter["s"])  # maybe closed
        return None

    def file(self, memfd_only: bool = False) -> Optional[str]:
        pool = [f for f, info in self.files.items() if info["memfd"] or not memfd_only]
        if pool and self.rng.random() < 0.95:
            return self.pick(pool)
        if self.counter["f"]:
            return "f%d" % self.rng.randrange(self.counter["f"])  # maybe closed
        return None

    def name(self) -> str:
        return self.pick(self.names)

    def token(self) -> int:
        r = self.rng.random()
        if r < 0.85:
            return self.pick(TOKENS)
        if r < 0.95:
            return self.rng.randrange(2**64)
        return self.pick((-1, 2**64))  # refused by the library before the ioctl

    def data(self) -> Dict[str, Any]:
        return {"seed": self.rng.randrange(2**32), "len": self.pick(SIZES),
                "off": self.pick((0, 0, 0, 1, 4096, 5000))}

    def raw_size(self, struct_size: int, min_size: int) -> Dict[str, Any]:
        """A size field and trailing bytes for a raw ioctl: mostly right,
        sometimes short (EINVAL), longer with zero tail (accepted), longer
        with a non-zero tail (E2BIG). ``self.size_ok`` tells which."""
        r = self.rng.random()
        self.size_ok = r < 0.4 or 0.55 <= r < 0.8
        if r < 0.4:
            return {"size": struct_size, "tail": ""}
        if r < 0.55:
            return {"size": self.pick((0, 4, min_size - 1)), "tail": ""}
        extra = self.pick((1, 4, 8, 56))
        if r < 0.8:
            return {"size": struct_size + extra, "tail": "00" * extra}
        tail = bytearray(extra)
        tail[self.rng.randrange(extra)] = self.rng.randrange(1, 256)
        return {"size": struct_size + extra, "tail": tail.hex()}

    def raw_name_field(self) -> str:
        """64 bytes: a valid name with junk after its NUL, or an invalid one
        (``self.raw_name`` is the valid name, else None)."""
        r = self.rng.random()
        self.raw_name: Optional[str] = None
        if r < 0.5:
            raw = self.name().encode()
            self.raw_name = raw.decode()
            field = raw + b"\0" + bytes(self.rng.randrange(256) for _ in range(63 - len(raw)))
        elif r < 0.7:
            field = b"\0" + bytes(self.rng.randrange(1, 256) for _ in range(63))  # empty
        elif r < 0.85:
            field = (self.prefix.encode() + b"X" * 64)[:64]  # no NUL in 64 bytes
        else:
            raw = self.name().encode()
            self.raw_name = raw.decode()
            field = raw + bytes(64 - len(raw))
        return field[:64].ljust(64, b"\0").hex()

    # -- operations ---------------------------------------------------------------
    def op_open(self) -> None:
        d = self.new("d")
        self.emit("open", d=d)
        if not self.devs:  # else EBUSY: one holder at a time, even the same process
            self.devs.append(d)

    def op_close_dev(self) -> None:
        d = self.dev()
        self.emit("close_dev", d=d)
        if d in self.devs:
            self.devs.remove(d)

    def op_create(self) -> None:
        s = self.new("s")
        r = self.rng.random()
        if r < 0.75:
            live = set(self.session_names.values())
            free = [n for n in self.names if n not in live]
            name = self.pick(free) if free else self.name()
        elif r < 0.93:
            name = self.name()
        else:
            name = self.pick(("", self.prefix + "N" * 64, self.prefix + "nul\0x"))
        self.emit("create", d=self.dev(), s=s, name=name)
        self.expect_session(s, "out", name if name in self.names else None)

    def expect_session(self, s: str, kind: str, name: Optional[str]) -> None:
        """Track ``s`` if the model expects it to exist: a valid name not
        taken (create) or handed over and not yet taken back (retrieve)."""
        if name is None or name in self.session_names.values():
            return
        if kind == "in" and name not in self.carried:
            return
        self.sessions[s] = kind
        self.session_names[s] = name

    def op_create_raw(self) -> None:
        s = self.new("s")
        self.emit("create_raw", d=self.dev(), s=s, name_field=self.raw_name_field(),
                  fd_field=self.pick((-1, 0, 12345)), **self.raw_size(72, 72))
        self.expect_session(s, "out", self.raw_name if self.size_ok else None)

    def op_retrieve_session(self, raw: bool = False) -> None:
        s = self.new("s")
        if raw:
            self.emit("retrieve_session_raw", d=self.dev(), s=s, name_field=self.raw_name_field(),
                      fd_field=-1, **self.raw_size(72, 72))
            self.expect_session(s, "in", self.raw_name if self.size_ok else None)
        else:
            carried = [n for n in self.carried if n not in self.session_names.values()]
            r = self.rng.random()
            if carried and r < 0.8:
                name = self.pick(carried)
            else:
                name = self.name() if r < 0.97 else self.prefix + "never"
            self.emit("retrieve_session", d=self.dev(), s=s, name=name)
            if name not in self.retrieved:
                self.expect_session(s, "in", name)
                self.retrieved.add(name)

    def op_memfd(self) -> None:
        f = self.new("f")
        flags = 0
        r = self.rng.random()
        if r < 0.6:
            flags |= MFD_ALLOW_SEALING
        if self.rng.random() < 0.5:
            flags |= MFD_CLOEXEC
        r = self.rng.random()
        if r < 0.1:
            flags |= MFD_NOEXEC_SEAL
        elif r < 0.15:
            flags |= MFD_EXEC
        elif r < 0.17:
            flags |= MFD_EXEC | MFD_NOEXEC_SEAL  # EINVAL
        seals = 0
        if self.rng.random() < 0.35:
            for seal in SEALS:
                if self.rng.random() < 0.25:
                    seals |= seal
        data = self.data()
        truncate = self.pick((None, None, None, 0, 10, 4096, 1 << 20))
        pos = self.pick((None, None, 0, 1, 4096, 4097, 1 << 30, 2**62))
        self.emit("memfd", f=f, flags=flags, data=data, truncate=truncate, pos=pos, seals=seals)
        self.group_counter += 1
        if flags & (MFD_EXEC | MFD_NOEXEC_SEAL) != MFD_EXEC | MFD_NOEXEC_SEAL:
            self.files[f] = {"group": self.group_counter, "memfd": True}

    def op_other_fd(self) -> None:
        f = self.new("f")
        kind = self.pick(OTHER_KINDS)
        self.emit("other_fd", f=f, kind=kind)
        self.group_counter += 1
        if kind != "hugetlb_memfd":  # usually no huge pages: the create fails
            self.files[f] = {"group": self.group_counter, "memfd": False}

    def op_alias(self) -> None:
        src = self.file()
        if src is None:
            return
        f = self.new("f")
        how = self.pick(("dup", "reopen_rw", "reopen_ro"))
        self.emit("alias", f=f, src=src, how=how)
        info = self.files.get(src, {"group": -1, "memfd": False})
        self.files[f] = dict(info)

    def op_preserve(self) -> None:
        s = self.session("out") if self.rng.random() < 0.9 else self.session()
        if s is None:
            return
        r = self.rng.random()
        if r < 0.85:
            f = self.file(memfd_only=self.rng.random() < 0.7)
            if f is None:
                return
            token = self.token()
            self.emit("preserve", s=s, f=f, token=token)
            if s in self.session_names:
                self.tokens.setdefault(self.session_names[s], []).append(token)
            if f in self.files:
                self.frozen_groups.add(self.files[f]["group"])
        elif r < 0.9:
            self.emit("preserve_fdnum", s=s, fdnum=self.pick(BAD_FDS), token=self.token())
        elif r < 0.95:
            self.emit("preserve_closed", s=s, token=self.token())
        else:
            target = self.session() or s
            how = self.pick(("session", "device"))
            self.emit("preserve_handle", s=s, target=target if how == "session" else self.dev(),
                      how=how, token=self.token())

    def op_preserve_raw(self) -> None:
        s = self.session()
        f = self.file(memfd_only=True)
        if s is None or f is None:
            return
        self.emit("preserve_raw", s=s, f=f, token=self.rng.randrange(2**64) if self.rng.random() < 0.3
                  else self.pick(TOKENS), **self.raw_size(16, 16))
        if f in self.files:
            self.frozen_groups.add(self.files[f]["group"])

    def op_retrieve(self, raw: bool = False) -> None:
        s = self.session("in") if self.rng.random() < 0.9 else self.session()
        if s is None:
            return
        f = self.new("f")
        known = self.carried_tokens.get(self.session_names.get(s, ""), [])
        token = self.pick(known) if known and self.rng.random() < 0.8 else self.token()
        if raw:
            self.emit("retrieve_raw", s=s, f=f, token=token if token in range(2**64) else 0,
                      fd_field=self.pick((-1, 5)), **self.raw_size(16, 16))
        else:
            self.emit("retrieve", s=s, f=f, token=token)
            if token in known and self.rng.random() < 0.25:
                # The same token again: the kernel hands out the same open
                # file, so a seek through one fd moves the other.
                again = self.new("f")
                self.emit("retrieve", s=s, f=again, token=token)
                self.emit("seek", f=f, pos=self.pick((0, 3, 4096)))
                self.emit("observe", f=again)
                self.files[again] = {"group": ("retrieved", self.session_names.get(s, s), token), "memfd": True}
        if token in known:
            # Every retrieve of a token gives the same file: one group, so
            # that preserving any of them again freezes all (see op_file_change).
            self.files[f] = {"group": ("retrieved", self.session_names.get(s, s), token), "memfd": True}

    def op_session_simple(self, what: str) -> None:
        s = self.session()
        if s is None:
            return
        if what == "finish_raw":
            self.emit(what, s=s, reserved=self.pick((0, 0, 1, 2**31)), **self.raw_size(8, 8))
        elif what == "get_name_raw":
            prefill = bytes(self.rng.randrange(256) for _ in range(64)) if self.rng.random() < 0.5 else bytes(64)
            self.emit(what, s=s, reserved=self.pick((0, 0, 0, 7)), prefill=prefill.hex(),
                      **self.raw_size(72, 72))
        else:
            self.emit(what, s=s)
        if what == "close_session":
            self.sessions.pop(s, None)
            self.session_names.pop(s, None)

    def op_bad_cmd(self) -> None:
        if self.rng.random() < 0.5:
            target = self.dev()
        else:
            target = self.session()
            if target is None:
                return
        self.emit("bad_cmd", target=target, cmd=self.pick(BAD_CMDS), arg=(bytes(8) + bytes(64)).hex())

    def op_file_change(self) -> None:
        f = self.file()
        if f is None:
            return
        info = self.files.get(f)
        frozen = info is None or info["group"] in self.frozen_groups
        r = self.rng.random()
        if r < 0.35:
            self.emit("seek", f=f, pos=self.pick((0, 1, 4095, 4096, 10**6, 2**40)))
        elif r < 0.65:
            # In place only for a file that may be preserved: the kernel
            # freezes its size, which the emulator documents it cannot enforce.
            self.emit("write", f=f, seed=self.rng.randrange(2**32), len=self.pick((1, 10, 4096, 5000)),
                      frac=self.rng.random(), inplace=frozen)
        elif r < 0.8 and not frozen:
            self.emit("truncate", f=f, size=self.pick(SIZES))
        elif r < 0.9:
            seals = 0
            for seal in SEALS:
                if self.rng.random() < 0.3:
                    seals |= seal
            if frozen:
                # Preserve pins the pages; F_SEAL_WRITE then waits for the
                # pins and fails (EBUSY), which the emulator cannot make
                # the host's fcntl do (like the size freeze). F_SEAL_EXEC
                # on an executable memfd implies F_SEAL_WRITE.
                seals &= ~(F_SEAL_WRITE | F_SEAL_EXEC)
            self.emit("add_seals", f=f, seals=seals)
        else:
            self.emit("observe", f=f)

    def op_close_file(self) -> None:
        f = self.file()
        if f is None:
            return
        self.emit("close", f=f)
        self.files.pop(f, None)

    # -- phases ----------------------------------------------------------------------
    def stage1(self, n: int) -> None:
        self.op_open()
        table = [
            (6, lambda: self.op_create()), (2, self.op_create_raw), (14, self.op_memfd),
            (3, self.op_other_fd), (3, self.op_alias), (22, self.op_preserve), (4, self.op_preserve_raw),
            (2, lambda: self.op_retrieve()), (1, lambda: self.op_retrieve(raw=True)),
            (1, lambda: self.op_retrieve_session()), (1, lambda: self.op_retrieve_session(raw=True)),
            (2, lambda: self.op_session_simple("finish")), (1, lambda: self.op_session_simple("finish_raw")),
            (3, lambda: self.op_session_simple("get_name")), (2, lambda: self.op_session_simple("get_name_raw")),
            (3, lambda: self.op_session_simple("close_session")), (2, self.op_bad_cmd),
            (10, self.op_file_change), (4, self.op_close_file), (1, self.op_open), (1, self.op_close_dev),
        ]
        self.run_table(table, n)
        # Many sessions should reach the kexec: create the missing ones
        # and give them files, then let go of the device (the next trace
        # opens it) while the sessions stay open.
        for _ in range(3):
            self.op_create()
            for _ in range(2):
                self.op_memfd()
                self.op_preserve()
        for d in list(self.devs):
            self.emit("close_dev", d=d)
        self.devs = []

    def stage2(self, n: int) -> None:
        # What may have crossed: the sessions the model still holds.
        self.carried = sorted(set(self.session_names[s] for s in self.sessions if s in self.session_names
                                  and self.sessions[s] == "out"))
        self.carried_tokens = {name: sorted(set(t for t in self.tokens.get(name, []) if 0 <= t < 2**64))
                               for name in self.carried}
        self.reset_objects()
        self.op_open()
        for _ in range(len(self.carried) + 1):
            self.op_retrieve_session()
        table = [
            (8, lambda: self.op_retrieve_session()), (2, lambda: self.op_retrieve_session(raw=True)),
            (20, lambda: self.op_retrieve()), (3, lambda: self.op_retrieve(raw=True)),
            (5, lambda: self.op_session_simple("finish")), (2, lambda: self.op_session_simple("finish_raw")),
            (3, lambda: self.op_session_simple("get_name")), (2, lambda: self.op_session_simple("get_name_raw")),
            (3, lambda: self.op_session_simple("close_session")), (4, lambda: self.op_create()),
            (1, self.op_create_raw), (5, self.op_memfd), (1, self.op_other_fd), (2, self.op_alias),
            (8, self.op_preserve), (1, self.op_preserve_raw), (2, self.op_bad_cmd), (12, self.op_file_change),
            (3, self.op_close_file), (1, self.op_open), (1, self.op_close_dev),
        ]
        self.run_table(table, n)
        self.emit("teardown")

    def run_table(self, table: List[Any], n: int) -> None:
        total = sum(w for w, _ in table)
        start = len(self.ops)
        while len(self.ops) - start < n:
            x = self.rng.randrange(total)
            for weight, fn in table:
                if x < weight:
                    fn()
                    break
                x -= weight


def generate(seed: int, trace_no: int = 0, n_ops: int = OPS_PER_TRACE) -> List[Dict[str, Any]]:
    """The trace of ``seed``: about ``n_ops`` operations, 60 % before the
    kexec. ``trace_no`` picks the session-name prefix (``t<trace_no>-``)."""
    g = _Gen(seed, trace_no, n_ops)
    g.stage1(int(n_ops * 0.6))
    g.emit("kexec")
    g.stage2(max(1, n_ops - len(g.ops)))
    return g.ops


def op_refs(op: Dict[str, Any]) -> List[str]:
    """What an operation touches: object ids, and session names (which
    link a create before the kexec with a retrieve after it). Used to slice
    a trace down to the operations that matter for one outcome."""
    refs = []
    for key in ("d", "s", "f", "src", "target"):
        if key in op and isinstance(op[key], str):
            refs.append(op[key])
    if "name" in op:
        refs.append("name:" + op["name"].split("\0", 1)[0])
    if "name_field" in op:
        field = bytes.fromhex(op["name_field"])
        refs.append("name:" + field.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return refs
