"""Random operation sequences against a small model of the kernel.

A hypothesis state machine drives one emulator through create, retrieve,
preserve, retrieve-fd, finish, close (valid and invalid arguments) and
kexecs, and checks after every step that

* each call succeeded or failed exactly as the model of luo_session.c /
  luo_file.c says (errno included);
* the outgoing block chains have the block counts the kernel's grow/shrink
  rules give (kho_block.c), are linked in memory head to tail, and carry no
  entry counts before serialization;

and after every kexec that the bytes handed over (root, session chain,
file chains, memfd records) are exactly what the model predicts, and that
retrieved files hold the contents, position and seals of the kexec moment.

Examples: ``LIVEUPDATE_HYPOTHESIS_PROFILE=long`` for a longer run (default
"ci" keeps the whole emulator suite well under three minutes).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import tempfile
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from liveupdate import KernelPanic
from liveupdate.emulator import Emulator, PhysicalMemory

settings.register_profile("ci", max_examples=100, stateful_step_count=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("long", max_examples=1000, stateful_step_count=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
PROFILE = os.environ.get("LIVEUPDATE_HYPOTHESIS_PROFILE", "ci")

PAGE = 4096
U64 = struct.Struct("<Q")
SESSIONS_PER_BLOCK = (PAGE - 16) // 80
FILES_PER_BLOCK = (PAGE - 16) // 64

VALID_NAMES = ["a", "b", "c", "é-ü", "x" * 63]
INVALID_NAMES = ["", "y" * 64]
TOKENS = [0, 1, 2, 2**64 - 1]
SEAL_CHOICES = [0, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class File:
    """A file of the current process: an fd and the identity of the file
    behind it (fresh memfd, or a retrieved file)."""

    def __init__(self, fd: int, fid: Any) -> None:
        self.fd = fd
        self.fid = fid


class OutSession:
    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.files: Dict[int, File] = {}  # token -> file, in preservation order


class Snapshot:
    """A preserved file as the kexec froze it."""

    def __init__(self, data: bytes, pos: int, seals: int) -> None:
        self.data = data
        self.pos = pos
        self.seals = seals


class InSession:
    def __init__(self, files: Dict[int, Snapshot]) -> None:
        self.files = files
        self.handle: Any = None
        self.retrieved = False
        self.finished = False


class LuoMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.emu = Emulator()
        self.dev = self.emu.open()
        self.num = 0
        self.out: Dict[str, OutSession] = {}
        self.inc: Dict[str, InSession] = {}
        self.session_blocks = 0
        self.busy: Set[Any] = set()
        self.pool: List[File] = []
        self.retrieved: List[File] = []
        self.stale: List[Any] = []
        self.serial = 0
        self.null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.tmpdir = tempfile.mkdtemp(prefix="luo-props-")
        self.old_emulators: List[Emulator] = []
        self.steps = 0

    @initialize(data=st.data(), sessions=st.integers(0, 3))
    def make_pool(self, data: Any, sessions: int) -> None:
        # Start from some preserved state, so that short runs already kexec
        # something worth checking.
        self._new_pool()
        for name in VALID_NAMES[:sessions]:
            self.out[name] = s = OutSession(self.dev.create_session(name))
            self.session_blocks = ceil_div(len(self.out), SESSIONS_PER_BLOCK)
            for which in data.draw(st.lists(st.integers(0, 3), max_size=3, unique=True), label="files"):
                f = self.pool[which]
                if f.fid not in self.busy:
                    s.handle.preserve(f.fd, which)
                    s.files[which] = f
                    self.busy.add(f.fid)

    def _new_pool(self) -> None:
        for i in range(4):
            fd = os.memfd_create(f"pool-{i}", os.MFD_ALLOW_SEALING)
            os.write(fd, b"pool %d " % i * (i * 300 + 1))
            self.serial += 1
            self.pool.append(File(fd, ("memfd", self.serial)))

    # -- helpers --------------------------------------------------------------------
    def expect(self, code: Optional[int], call: Any) -> Any:
        if code is None:
            return call()
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"
        return None

    def handle(self, name: str) -> Tuple[Optional[str], Any]:
        if name in self.out:
            return "out", self.out[name].handle
        if name in self.inc and self.inc[name].handle is not None:
            return "in", self.inc[name].handle
        return None, None

    def files_of_process(self) -> List[File]:
        return self.pool + self.retrieved

    # -- sessions -------------------------------------------------------------------
    @rule(name=st.sampled_from(VALID_NAMES + INVALID_NAMES))
    def create(self, name: str) -> None:
        if name in INVALID_NAMES:
            self.expect(errno.EINVAL, lambda: self.dev.create_session(name))
            return
        # luo_session_insert(): grow to count + 1 first, then the duplicate check.
        self.session_blocks = max(self.session_blocks, ceil_div(len(self.out) + 1, SESSIONS_PER_BLOCK))
        if name in self.out:
            self.expect(errno.EEXIST, lambda: self.dev.create_session(name))
            return
        self.out[name] = OutSession(self.dev.create_session(name))

    @rule(data=st.data())
    def retrieve_session(self, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.inc) + VALID_NAMES + INVALID_NAMES), label="name")
        if name in INVALID_NAMES:
            self.expect(errno.EINVAL, lambda: self.dev.retrieve_session(name))
            return
        s = self.inc.get(name)
        if s is None:
            self.expect(errno.ENOENT, lambda: self.dev.retrieve_session(name))
        elif s.retrieved:
            self.expect(errno.EINVAL, lambda: self.dev.retrieve_session(name))
        else:
            s.handle = self.dev.retrieve_session(name)
            s.retrieved = True
            assert s.handle.name == name

    @precondition(lambda self: any(not s.retrieved for s in self.inc.values()))
    @rule(data=st.data())
    def retrieve_handed_over_session(self, data: Any) -> None:
        # The same as retrieve_session, aimed at what was handed over, so
        # that runs reach the retrieve-fd and finish paths often.
        name = data.draw(st.sampled_from(sorted(n for n, s in self.inc.items() if not s.retrieved)), label="name")
        s = self.inc[name]
        s.handle = self.dev.retrieve_session(name)
        s.retrieved = True
        assert s.handle.name == name

    def open_names(self) -> List[str]:
        return sorted(self.out) + sorted(n for n, s in self.inc.items() if s.handle is not None)

    def incoming_open(self) -> List[str]:
        return sorted(n for n, s in self.inc.items() if s.handle is not None)

    @precondition(lambda self: self.open_names())
    @rule(data=st.data())
    def close_session(self, data: Any) -> None:
        name = data.draw(st.sampled_from(self.open_names()), label="name")
        kind, handle = self.handle(name)
        handle.close()
        if kind == "out":
            for f in self.out.pop(name).files.values():
                self.busy.discard(f.fid)
            # luo_session_remove() -> kho_block_set_shrink(count)
            count = len(self.out)
            while self.session_blocks > 0 and count <= (self.session_blocks - 1) * SESSIONS_PER_BLOCK:
                self.session_blocks -= 1
        else:
            self._finish_model(name)
            del self.inc[name]

    def _finish_model(self, name: str) -> None:
        s = self.inc[name]
        for token in s.files:
            self.busy.discard(("retrieved", self.num, name, token))
        s.files = {}
        s.finished = True

    # -- files -----------------------------------------------------------------------------
    @precondition(lambda self: self.out)
    @rule(data=st.data(), which=st.integers(0, 20), token=st.sampled_from(TOKENS),
          bad=st.sampled_from([None, None, None, None, "closed", "null"]))
    def preserve(self, data: Any, which: int, token: int, bad: Optional[str]) -> None:
        name = data.draw(st.sampled_from(sorted(self.out)), label="name")
        handle = self.out[name].handle
        files = self.files_of_process()
        target = files[which % len(files)]
        if bad == "closed":
            fd = os.memfd_create("closed")
            os.close(fd)
        elif bad == "null":
            fd = self.null
        else:
            fd = target.fd
        s = self.out[name]
        if token in s.files:
            code: Optional[int] = errno.EEXIST
        elif bad == "closed":
            code = errno.EBADF
        elif bad == "null":
            code = errno.ENOENT
        elif target.fid in self.busy:
            code = errno.EBUSY
        else:
            code = None
        self.expect(code, lambda: handle.preserve(fd, token))
        if code is None:
            s.files[token] = target
            self.busy.add(target.fid)

    @precondition(lambda self: self.incoming_open())
    @rule(data=st.data(), which=st.integers(0, 20))
    def preserve_on_incoming(self, data: Any, which: int) -> None:
        name = data.draw(st.sampled_from(self.incoming_open()), label="name")
        files = self.files_of_process()
        self.expect(errno.EINVAL, lambda: self.inc[name].handle.preserve(files[which % len(files)].fd, 0))

    @precondition(lambda self: self.out)
    @rule(data=st.data(), token=st.sampled_from(TOKENS))
    def on_outgoing_einval(self, data: Any, token: int) -> None:
        handle = self.out[data.draw(st.sampled_from(sorted(self.out)), label="name")].handle
        self.expect(errno.EINVAL, lambda: handle.retrieve(token))
        self.expect(errno.EINVAL, handle.finish)

    @precondition(lambda self: self.incoming_open())
    @rule(data=st.data())
    def retrieve_fd(self, data: Any) -> None:
        name = data.draw(st.sampled_from(self.incoming_open()), label="name")
        s = self.inc[name]
        handle = s.handle
        token = data.draw(st.sampled_from(sorted(s.files) + TOKENS + [12345]), label="token")
        if token not in s.files:
            self.expect(errno.ENOENT, lambda: handle.retrieve(token))
            return
        self._retrieve_checked(name, token)

    @precondition(lambda self: any(s.files and not s.finished for s in self.inc.values()))
    @rule(data=st.data())
    def retrieve_every_file(self, data: Any) -> None:
        # Aimed at the incoming sessions that still hold files, so every run
        # that handed files over also checks them on the other side.
        name = data.draw(st.sampled_from(sorted(n for n, s in self.inc.items() if s.files and not s.finished)),
                         label="name")
        s = self.inc[name]
        if s.handle is None:
            s.handle = self.dev.retrieve_session(name)
            s.retrieved = True
        for token in list(s.files):
            self._retrieve_checked(name, token)

    def _retrieve_checked(self, name: str, token: int) -> None:
        s = self.inc[name]
        snap = s.files[token]
        fid = ("retrieved", self.num, name, token)
        earlier = [f for f in self.retrieved if f.fid == fid]
        fd = s.handle.retrieve(token)
        self.retrieved.append(File(fd, fid))
        self.busy.add(fid)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        if earlier:
            # Another fd of the file already retrieved: whatever it holds now.
            a, b = os.fstat(fd), os.fstat(earlier[0].fd)
            assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            assert os.lseek(fd, 0, os.SEEK_CUR) == os.lseek(earlier[0].fd, 0, os.SEEK_CUR)
            return
        assert os.fstat(fd).st_size == len(snap.data)
        assert os.pread(fd, len(snap.data) + 1, 0) == snap.data
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == snap.seals
        assert os.lseek(fd, 0, os.SEEK_CUR) == snap.pos

    @precondition(lambda self: self.incoming_open())
    @rule(data=st.data())
    def finish(self, data: Any) -> None:
        name = data.draw(st.sampled_from(self.incoming_open()), label="name")
        self.inc[name].handle.finish()
        self._finish_model(name)

    @rule(which=st.integers(0, 20), offset=st.integers(0, 3 * PAGE), data=st.binary(min_size=1, max_size=64))
    def write(self, which: int, offset: int, data: bytes) -> None:
        files = self.files_of_process()
        f = files[which % len(files)]
        size = os.fstat(f.fd).st_size
        seals = fcntl.fcntl(f.fd, fcntl.F_GET_SEALS)
        if seals & (fcntl.F_SEAL_WRITE | 0x10):
            return
        if f.fid in self.busy or seals & fcntl.F_SEAL_GROW:
            # A preserved file's size is frozen: write within it only.
            if size == 0:
                return
            offset %= size
            data = data[: size - offset]
        os.pwrite(f.fd, data, offset)

    @rule(which=st.integers(0, 20), pos=st.integers(0, 5 * PAGE))
    def seek(self, which: int, pos: int) -> None:
        files = self.files_of_process()
        os.lseek(files[which % len(files)].fd, pos, os.SEEK_SET)

    @rule(which=st.integers(0, 3), seals=st.sampled_from(SEAL_CHOICES))
    def seal(self, which: int, seals: int) -> None:
        f = self.pool[which]
        if f.fid in self.busy or not seals:
            return  # the kernel reads the seals at preserve: change them before only
        try:
            fcntl.fcntl(f.fd, fcntl.F_ADD_SEALS, seals)
        except OSError as exc:
            assert exc.errno in (errno.EPERM, errno.EBUSY)

    # -- the reboot ----------------------------------------------------------------------------
    @precondition(lambda self: self.steps >= 4)
    @rule()
    def kexec(self) -> None:
        self._reboot(through_image=False)

    @precondition(lambda self: self.steps >= 2 and any(s.files for s in self.out.values()))
    @rule()
    def kexec_with_files(self) -> None:
        self._reboot(through_image=False)

    @precondition(lambda self: self.steps >= 2 and any(s.files for s in self.out.values()))
    @rule()
    def kexec_through_an_image(self) -> None:
        # The handover saved to an image file and booted by a new Emulator:
        # the retrieved files are rebuilt from the image's bytes.
        self._reboot(through_image=True)

    def _reboot(self, through_image: bool) -> None:
        self.steps = 0
        snapshots: Dict[str, Dict[int, Snapshot]] = {}
        for name, s in self.out.items():
            snapshots[name] = {}
            for token, f in s.files.items():
                size = os.fstat(f.fd).st_size
                snapshots[name][token] = Snapshot(os.pread(f.fd, size + 1, 0), os.lseek(f.fd, 0, os.SEEK_CUR),
                                                  fcntl.fcntl(f.fd, fcntl.F_GET_SEALS))
        leaked = self.session_blocks > ceil_div(len(self.out), SESSIONS_PER_BLOCK)
        self.dev.close()
        if leaked:
            # An empty trailing session block (a duplicate refused at a full
            # block) fails the next boot, as in the kernel.
            with pytest.raises(KernelPanic):
                self.emu.kexec()
            self._drop_process()
            self.emu = Emulator()
            self.num = 0
            self.inc = {}
        else:
            if through_image:
                path = os.path.join(self.tmpdir, "handover.img")
                self.emu.kexec(image=path)
                self.old_emulators.append(self.emu)  # its stale handles still answer ESTALE
                self.emu = Emulator.from_image(path)
            else:
                self.emu.kexec()
            self.num += 1
            self._check_handover(snapshots)
            self._drop_process()
            self.inc = {name: InSession(files) for name, files in snapshots.items()}
        self.out = {}
        self.session_blocks = 0
        self.busy = set()
        self.dev = self.emu.open()

    def _drop_process(self) -> None:
        # After a real kexec the old process is gone: its fds, and its
        # handles (which the emulator now answers with ESTALE).
        for s in list(self.out.values()) + [s for s in self.inc.values() if s.handle is not None]:
            with pytest.raises(OSError) as info:
                s.handle.name
            assert info.value.errno == errno.ESTALE
            s.handle.close()
        for f in self.pool + self.retrieved:
            os.close(f.fd)
        self.pool = []
        self.retrieved = []
        self._new_pool()

    def _check_handover(self, snapshots: Dict[str, Dict[int, Snapshot]]) -> None:
        handover = self.emu.memory.handover
        mem = PhysicalMemory()
        mem.pages = handover.pages
        mem.folios = handover.folios
        root_pa, root_size = handover.subtrees["LUO"]
        raw = mem.read(root_pa, 32)
        assert root_size == 32 and raw[:8] == b"luo-v5\0\0"
        assert U64.unpack_from(raw, 8)[0] == self.num
        sessions_pa = U64.unpack_from(raw, 16)[0]
        entries = self._chain(mem, sessions_pa, 80, len(snapshots), SESSIONS_PER_BLOCK)
        assert [e[:64] for e in entries] == [n.encode().ljust(64, b"\0") for n in snapshots]
        for entry, (name, files) in zip(entries, snapshots.items()):
            files_pa, count = U64.unpack_from(entry, 64)[0], U64.unpack_from(entry, 72)[0]
            assert count == len(files)
            fentries = self._chain(mem, files_pa, 64, len(files), FILES_PER_BLOCK)
            assert [U64.unpack_from(e, 56)[0] for e in fentries] == list(files)
            for e, snap in zip(fentries, files.values()):
                assert e[:48] == b"memfd-v2".ljust(48, b"\0")
                rec = mem.read(U64.unpack_from(e, 48)[0], 48)
                pos, size, seals, flags, nr = struct.unpack_from("<QQIIQ", rec)
                assert (pos, size, seals, flags) == (snap.pos, len(snap.data), snap.seals, 0)
                assert nr == ceil_div(size, PAGE)

    def _chain(self, mem: PhysicalMemory, head: int, size: int, count: int, per: int) -> List[bytes]:
        if count == 0:
            assert head == 0
            return []
        out: List[bytes] = []
        pa = head
        shape = []
        while pa:
            page = mem.read(pa, PAGE)
            nxt, n = U64.unpack_from(page, 0)[0], U64.unpack_from(page, 8)[0]
            shape.append(n)
            out.extend(page[16 + i * size: 16 + (i + 1) * size] for i in range(n))
            assert len(shape) <= ceil_div(count, per)
            pa = nxt
        full, rest = divmod(count, per)
        assert shape == [per] * full + ([rest] if rest else [])
        return out

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def count_steps(self) -> None:
        self.steps += 1

    @invariant()
    def outgoing_chains(self) -> None:
        kernel = self.emu.kernel
        assert kernel is not None
        assert self.emu.liveupdate_num == self.num
        header = kernel.sessions.outgoing
        assert [n.decode() for n in header.sessions] == list(self.out)
        self._linked(header.block_set, self.session_blocks)
        for name, s in self.out.items():
            fs = header.sessions[name.encode()].file_set
            assert fs.count == len(s.files)
            self._linked(fs.block_set, ceil_div(len(s.files), FILES_PER_BLOCK))

    def _linked(self, bs: Any, expected_blocks: int) -> None:
        assert bs.nblocks == expected_blocks
        pa = bs.head_pa
        seen = []
        while pa:
            assert pa % PAGE == 0 and pa not in seen
            seen.append(pa)
            assert U64.unpack(self.emu.memory.read(pa + 8, 8))[0] == 0  # no counts before serialize
            pa = U64.unpack(self.emu.memory.read(pa, 8))[0]
        assert seen == list(bs.blocks)

    def teardown(self) -> None:
        for s in self.out.values():
            s.handle.close()
        for s in self.inc.values():
            if s.handle is not None:
                s.handle.close()
        self.dev.close()
        for f in self.pool + self.retrieved:
            os.close(f.fd)
        os.close(self.null)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


LuoMachine.TestCase.settings = settings.get_profile(PROFILE)
TestLuoMachine = LuoMachine.TestCase


class ManySessionsMachine(LuoMachine):
    """The same model with enough names to cross block boundaries (51
    sessions a block), where a refused duplicate leaves an empty block."""

    @rule(count=st.integers(40, 60))
    def create_many(self, count: int) -> None:
        for i in range(count):
            name = f"bulk-{i}"
            self.session_blocks = max(self.session_blocks, ceil_div(len(self.out) + 1, SESSIONS_PER_BLOCK))
            if name in self.out:
                self.expect(errno.EEXIST, lambda: self.dev.create_session(name))
            else:
                self.out[name] = OutSession(self.dev.create_session(name))

    @rule(keep=st.integers(0, 60))
    def close_many(self, keep: int) -> None:
        for name in [n for n in self.out if n.startswith("bulk-")][keep:]:
            self.close_session_named(name)

    def close_session_named(self, name: str) -> None:
        self.out[name].handle.close()
        for f in self.out.pop(name).files.values():
            self.busy.discard(f.fid)
        count = len(self.out)
        while self.session_blocks > 0 and count <= (self.session_blocks - 1) * SESSIONS_PER_BLOCK:
            self.session_blocks -= 1


ManySessionsMachine.TestCase.settings = settings(settings.get_profile(PROFILE),
                                                 max_examples=max(10, settings.get_profile(PROFILE).max_examples // 4))
TestManySessionsMachine = ManySessionsMachine.TestCase
