"""Run traces (:mod:`.trace`) against one backend and record every outcome.

An outcome is a JSON-able dict: ``{"ok": true, ...}`` with what came back
(struct bytes with fd numbers masked, names, observations of retrieved
files) or ``{"err": "ENOENT"}`` (the errno's name) or ``{"exc": "ValueError"}``
(a refusal by the library before any ioctl; the same library runs on both
backends, so these match trivially but keep the traces honest). fd numbers
themselves are never recorded: the emulator keeps fds of its own, so the
numbers a process gets differ while the kernel behaviour does not.

Traces share one kernel: :func:`run_stage` runs the part of every trace on
one side of the kexec, in order. The emulator does all of it in one process
(:func:`run_emulator`: stage 1 of every trace, ``emu.kexec()``, stage 2 of
every trace); on the real kernel stage 1 runs in one process that kexecs
while it holds its sessions, and stage 2 in the next kernel
(:mod:`.guest`). Both thus see the same sequence of kernel calls.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import re
import socket
import stat
import struct
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import liveupdate
from liveupdate import _abi

__all__ = ["TraceRunner", "run_stage", "run_emulator", "kexec_index", "observe"]

F_GET_SEALS = 1034
F_ADD_SEALS = 1033
MFD_HUGETLB = 0x4
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
CONTENT_LIMIT = 4 << 20
# Where the non-memfd files live: /dev/shm is a tmpfs in the guest and on
# usual hosts alike (a linked tmpfs file is shmem but has a name: ENOENT).
SHM_DIR = "/dev/shm"

_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def bad_command(target_kind: str, what: str) -> int:
    """A command number the kernel must refuse (EINVAL for a number out of
    the table, ENOTTY for a number in it that is not exactly the command)."""
    t = _abi.IOCTL_TYPE
    if target_kind == "device":
        table = {"nr_low": _ioc(0, t, 0x02, 0), "nr_high": _ioc(0, t, 0x3F, 0),
                 "dir_bits": _ioc(_IOC_READ | _IOC_WRITE, t, 0x00, 72),
                 "other_type": _ioc(0, ord("X"), 0x01, 0),
                 "session_cmd_on_device": _ioc(0, t, 0x40, 0),
                 "device_cmd_on_session": _ioc(0, t, 0x01, 0) | (1 << 30) | (8 << 16)}
    else:
        table = {"nr_low": _ioc(0, t, 0x3F, 0), "nr_high": _ioc(0, t, 0x44, 0),
                 "dir_bits": _ioc(_IOC_READ | _IOC_WRITE, t, 0x42, 16),
                 "other_type": _ioc(0, ord("X"), 0x43, 0),
                 "session_cmd_on_device": _ioc(0, t, 0x41, 0) | (2 << 30) | (16 << 16),
                 "device_cmd_on_session": _ioc(0, t, 0x00, 0)}
    return table[what]


def kexec_index(ops: List[Dict[str, Any]]) -> int:
    for i, op in enumerate(ops):
        if op["op"] == "kexec":
            return i
    return len(ops)


def _err(exc: BaseException) -> Dict[str, Any]:
    if isinstance(exc, OSError) and exc.errno is not None:
        return {"err": errno.errorcode.get(exc.errno, str(exc.errno))}
    return {"exc": type(exc).__name__}


def _bytes_of(seed: int, n: int) -> bytes:
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little") if n else b""


def observe(fd: int, groups: Dict[Tuple[int, int], str], name: str) -> Dict[str, Any]:
    """What a process can see of an open file ``name``, minus fd and inode
    numbers: identity is the name of the first object of this stage seen
    with the same inode (so dropping unrelated ops from a trace does not
    renumber anything), contents a hash."""
    out: Dict[str, Any] = {}
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    out["same_as"] = groups.setdefault(key, name)
    out["type"] = stat.S_IFMT(st.st_mode)
    out["perm"] = oct(stat.S_IMODE(st.st_mode))
    out["nlink"] = st.st_nlink
    out["cloexec"] = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    out["flags"] = hex(fcntl.fcntl(fd, fcntl.F_GETFL))
    try:
        # Inode numbers and this process's pid are no part of the kernel's answer.
        link = os.readlink("/proc/self/fd/%d" % fd)
        link = re.sub(r"^/proc/\d+/", "/proc/PID/", link.replace("-%d-" % os.getpid(), "-PID-"))
        out["link"] = re.sub(r"#\d+", "#N", link)
    except OSError as exc:
        out["link"] = _err(exc)
    if not stat.S_ISREG(st.st_mode):
        # Pipes, sockets, devices: their links carry inode numbers.
        out["link"] = out["link"].split(":", 1)[0] if isinstance(out["link"], str) else out["link"]
        return out
    out["size"] = st.st_size
    try:
        out["pos"] = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError as exc:
        out["pos"] = _err(exc)
    try:
        out["seals"] = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as exc:
        out["seals"] = _err(exc)
    h = hashlib.sha256()
    offset = 0
    first = b""
    try:
        while offset < min(st.st_size, CONTENT_LIMIT):
            chunk = os.pread(fd, min(1 << 20, CONTENT_LIMIT - offset), offset)
            if not chunk:
                break
            if not offset:
                first = chunk[:16]
            h.update(chunk)
            offset += len(chunk)
        out["sha"] = h.hexdigest()[:24]
        out["head"] = first.hex()
    except OSError as exc:
        out["sha"] = _err(exc)
    return out


class Missing(Exception):
    """The op names an object this trace does not have (never made, failed,
    or already closed)."""


class TraceRunner:
    """One trace against one backend. ``open_device`` opens the backend's
    device (a :class:`liveupdate.Device`)."""

    def __init__(self, trace_no: int, ops: List[Dict[str, Any]], open_device: Callable[[], Any]) -> None:
        self.trace_no = trace_no
        self.ops = ops
        self.open_device = open_device
        self.pos = 0
        self.devs: Dict[str, Any] = {}
        self.sessions: Dict[str, Any] = {}
        self.files: Dict[str, int] = {}
        self.groups: Dict[Tuple[int, int], str] = {}
        self.linked: List[str] = []

    # -- objects ---------------------------------------------------------------
    def dev(self, name: str) -> Any:
        dev = self.devs.get(name)
        if dev is None or dev.closed:
            raise Missing(name)
        return dev

    def session(self, name: str) -> Any:
        s = self.sessions.get(name)
        if s is None or s.closed:
            raise Missing(name)
        return s

    def fd(self, name: str) -> int:
        fd = self.files.get(name)
        if fd is None:
            raise Missing(name)
        return fd

    def handle_fd(self, name: str) -> int:
        """The fd of a device or session object (for raw ioctls)."""
        obj = self.devs.get(name) if name.startswith("d") else self.sessions.get(name)
        if obj is None or obj.closed:
            raise Missing(name)
        return obj.fileno()

    def port_of(self, name: str) -> Any:
        obj = self.devs.get(name) if name.startswith("d") else self.sessions.get(name)
        if obj is None or obj.closed:
            raise Missing(name)
        return obj._port

    # -- running -------------------------------------------------------------------
    def run(self, stop_at_kexec: bool) -> List[Dict[str, Any]]:
        """Run from the current position to the kexec (``stop_at_kexec``;
        the kexec op itself is consumed) or to the end."""
        records = []
        while self.pos < len(self.ops):
            i = self.pos
            op = self.ops[i]
            self.pos += 1
            if op["op"] == "kexec":
                records.append(self.record(i, op, {"ok": True}))
                if stop_at_kexec:
                    break
                continue
            try:
                out = getattr(self, "op_" + op["op"])(op)
                if out is None:
                    out = {}
                out = dict({"ok": True}, **out)
            except Missing as exc:
                out = {"missing": str(exc)}
            except Exception as exc:  # noqa: BLE001 - every failure is an outcome
                out = _err(exc)
            records.append(self.record(i, op, out))
        return records

    def record(self, i: int, op: Dict[str, Any], out: Dict[str, Any]) -> Dict[str, Any]:
        return {"trace": self.trace_no, "i": i, "op": op["op"], "out": out}

    def drop(self) -> None:
        """Forget every object without recording anything: what a real kexec
        does to the process that held them (on the emulator, after
        ``emu.kexec()`` the handles are stale and closing them only frees
        the fds)."""
        for s in self.sessions.values():
            try:
                s.close()
            except Exception:  # noqa: BLE001 - stale handles may refuse; the fd is gone either way
                pass
        for d in self.devs.values():
            try:
                d.close()
            except Exception:  # noqa: BLE001
                pass
        for fd in self.files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        for path in self.linked:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.sessions, self.devs, self.files, self.linked = {}, {}, {}, []
        self.groups = {}

    def new_file(self, name: str, fd: int) -> None:
        old = self.files.pop(name, None)
        if old is not None:
            os.close(old)
        self.files[name] = fd

    # -- device ops -------------------------------------------------------------------
    def op_open(self, op: Dict[str, Any]) -> Any:
        self.devs[op["d"]] = self.open_device()

    def op_close_dev(self, op: Dict[str, Any]) -> Any:
        self.dev(op["d"]).close()

    def op_create(self, op: Dict[str, Any]) -> Any:
        s = self.dev(op["d"]).create_session(op["name"])
        self.sessions[op["s"]] = s
        return {"name": s.name}

    def op_retrieve_session(self, op: Dict[str, Any]) -> Any:
        s = self.dev(op["d"]).retrieve_session(op["name"])
        self.sessions[op["s"]] = s
        return {"name": s.name}

    def _raw_session(self, op: Dict[str, Any], cmd: int, kind: str) -> Any:
        d = op["d"]
        arg = (struct.pack("=Ii", op["size"], op["fd_field"]) + bytes.fromhex(op["name_field"])
               + bytes.fromhex(op["tail"]))
        out = self.port_of(d).ioctl(self.handle_fd(d), cmd, arg)
        fd = struct.unpack_from("=i", out, 4)[0]
        self.sessions[op["s"]] = liveupdate.Session._adopt(self.port_of(d), fd, kind, None)
        masked = out[:4] + b"FDFD" + out[8:]
        return {"out": masked.hex(), "name": self.sessions[op["s"]].name}

    def op_create_raw(self, op: Dict[str, Any]) -> Any:
        return self._raw_session(op, _abi.IOCTL_CREATE_SESSION, "outgoing")

    def op_retrieve_session_raw(self, op: Dict[str, Any]) -> Any:
        return self._raw_session(op, _abi.IOCTL_RETRIEVE_SESSION, "incoming")

    def op_bad_cmd(self, op: Dict[str, Any]) -> Any:
        target = op["target"]
        kind = "device" if target.startswith("d") else "session"
        out = self.port_of(target).ioctl(self.handle_fd(target), bad_command(kind, op["cmd"]),
                                         bytes.fromhex(op["arg"]))
        return {"out": out.hex()}

    # -- session ops -------------------------------------------------------------------
    def op_preserve(self, op: Dict[str, Any]) -> Any:
        self.session(op["s"]).preserve(self.fd(op["f"]), op["token"])

    def op_preserve_fdnum(self, op: Dict[str, Any]) -> Any:
        self.session(op["s"]).preserve(op["fdnum"], op["token"])

    def op_preserve_closed(self, op: Dict[str, Any]) -> Any:
        s = self.session(op["s"])
        fd = os.memfd_create("closed")
        os.close(fd)
        # Nothing opens an fd between the close and the call: the number is free.
        s.preserve(fd, op["token"])

    def op_preserve_handle(self, op: Dict[str, Any]) -> Any:
        s = self.session(op["s"])
        s.preserve(self.handle_fd(op["target"]), op["token"])

    def op_preserve_raw(self, op: Dict[str, Any]) -> Any:
        s = op["s"]
        arg = struct.pack("=IiQ", op["size"], self.fd(op["f"]), op["token"]) + bytes.fromhex(op["tail"])
        out = self.port_of(s).ioctl(self.handle_fd(s), _abi.SESSION_PRESERVE_FD, arg)
        return {"out": (out[:4] + b"FDFD" + out[8:]).hex()}

    def op_retrieve(self, op: Dict[str, Any]) -> Any:
        fd = self.session(op["s"]).retrieve(op["token"])
        self.new_file(op["f"], fd)
        return {"file": observe(fd, self.groups, op["f"])}

    def op_retrieve_raw(self, op: Dict[str, Any]) -> Any:
        s = op["s"]
        arg = struct.pack("=IiQ", op["size"], op["fd_field"], op["token"]) + bytes.fromhex(op["tail"])
        out = self.port_of(s).ioctl(self.handle_fd(s), _abi.SESSION_RETRIEVE_FD, arg)
        fd = struct.unpack_from("=i", out, 4)[0]
        self.new_file(op["f"], fd)
        return {"out": (out[:4] + b"FDFD" + out[8:]).hex(), "file": observe(fd, self.groups, op["f"])}

    def op_finish(self, op: Dict[str, Any]) -> Any:
        self.session(op["s"]).finish()

    def op_finish_raw(self, op: Dict[str, Any]) -> Any:
        s = op["s"]
        arg = struct.pack("=II", op["size"], op["reserved"]) + bytes.fromhex(op["tail"])
        return {"out": self.port_of(s).ioctl(self.handle_fd(s), _abi.SESSION_FINISH, arg).hex()}

    def op_get_name(self, op: Dict[str, Any]) -> Any:
        return {"name": self.session(op["s"]).name_bytes.hex()}

    def op_get_name_raw(self, op: Dict[str, Any]) -> Any:
        s = op["s"]
        arg = (struct.pack("=II", op["size"], op["reserved"]) + bytes.fromhex(op["prefill"])
               + bytes.fromhex(op["tail"]))
        return {"out": self.port_of(s).ioctl(self.handle_fd(s), _abi.SESSION_GET_NAME, arg).hex()}

    def op_close_session(self, op: Dict[str, Any]) -> Any:
        self.session(op["s"]).close()

    # -- file ops ---------------------------------------------------------------------------
    def op_memfd(self, op: Dict[str, Any]) -> Any:
        fd = os.memfd_create("m-" + op["f"], op["flags"])
        self.new_file(op["f"], fd)
        steps: Dict[str, Any] = {}
        data = op["data"]
        payload = _bytes_of(data["seed"], data["len"])
        if payload:
            os.pwrite(fd, payload, data["off"])
        if op["truncate"] is not None:
            os.ftruncate(fd, op["truncate"])
        if op["pos"] is not None:
            os.lseek(fd, op["pos"], os.SEEK_SET)
        if op["seals"]:
            try:
                fcntl.fcntl(fd, F_ADD_SEALS, op["seals"])
            except OSError as exc:
                steps["seals"] = _err(exc)
        steps["file"] = observe(fd, self.groups, op["f"])
        return steps

    def op_other_fd(self, op: Dict[str, Any]) -> Any:
        kind = op["kind"]
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            fd = r
        elif kind == "devnull":
            fd = os.open("/dev/null", os.O_RDWR)
        elif kind == "socket":
            a, b = socket.socketpair()
            b.close()
            fd = a.detach()
        elif kind == "procfile":
            fd = os.open("/proc/self/stat", os.O_RDONLY)
        elif kind == "dir":
            fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        elif kind == "shm_tmpfile":
            fd = os.open(SHM_DIR, O_TMPFILE | os.O_RDWR, 0o600)
            os.write(fd, b"tmpfile on tmpfs: shmem with no name")
        elif kind == "shm_linked":
            path = os.path.join(SHM_DIR, "luo-diff-%d-%d-%s" % (os.getpid(), self.trace_no, op["f"]))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self.linked.append(path)
            os.write(fd, b"linked tmpfs file")
        elif kind == "hugetlb_memfd":
            fd = os.memfd_create("huge", MFD_HUGETLB)
        else:
            raise ValueError(kind)
        self.new_file(op["f"], fd)
        return {"file": observe(fd, self.groups, op["f"])}

    def op_alias(self, op: Dict[str, Any]) -> Any:
        src = self.fd(op["src"])
        if op["how"] == "dup":
            fd = os.dup(src)
        else:
            flags = os.O_RDWR if op["how"] == "reopen_rw" else os.O_RDONLY
            fd = os.open("/proc/self/fd/%d" % src, flags)
        self.new_file(op["f"], fd)
        return {"file": observe(fd, self.groups, op["f"])}

    def op_seek(self, op: Dict[str, Any]) -> Any:
        return {"pos": os.lseek(self.fd(op["f"]), op["pos"], os.SEEK_SET)}

    def op_write(self, op: Dict[str, Any]) -> Any:
        fd = self.fd(op["f"])
        size = os.fstat(fd).st_size
        n = op["len"]
        if op["inplace"]:
            if size == 0:
                return {"skipped": "empty"}
            off = int(op["frac"] * size)
            n = min(n, size - off)
        else:
            off = int(op["frac"] * (size + 8192))
        return {"written": os.pwrite(fd, _bytes_of(op["seed"], n), off), "at": off}

    def op_truncate(self, op: Dict[str, Any]) -> Any:
        os.ftruncate(self.fd(op["f"]), op["size"])

    def op_add_seals(self, op: Dict[str, Any]) -> Any:
        fcntl.fcntl(self.fd(op["f"]), F_ADD_SEALS, op["seals"])
        return {"seals": fcntl.fcntl(self.fd(op["f"]), F_GET_SEALS)}

    def op_observe(self, op: Dict[str, Any]) -> Any:
        return {"file": observe(self.fd(op["f"]), self.groups, op["f"])}

    def op_close(self, op: Dict[str, Any]) -> Any:
        os.close(self.fd(op["f"]))
        del self.files[op["f"]]

    def op_teardown(self, op: Dict[str, Any]) -> Any:
        """The end of a trace: close everything, sessions first (closing
        an incoming session finishes it; its answer is part of the record)."""
        outcomes = {}
        for name, s in sorted(self.sessions.items(), key=lambda kv: int(kv[0][1:])):
            if s.closed:
                continue
            try:
                s.close()
                outcomes[name] = "ok"
            except Exception as exc:  # noqa: BLE001
                outcomes[name] = _err(exc)
        self.drop()
        return {"closed": outcomes}


def run_stage(runners: Iterable[TraceRunner], stage: int) -> List[Dict[str, Any]]:
    """Stage 1 (up to and including each trace's kexec op) or stage 2 (the
    rest) of every runner, in order, in the running kernel."""
    records: List[Dict[str, Any]] = []
    for runner in runners:
        records.extend(runner.run(stop_at_kexec=(stage == 1)))
    return records


def run_emulator(traces: List[List[Dict[str, Any]]], trace_numbers: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    """Every trace on a fresh emulator: stage 1 of all, one ``emu.kexec()``,
    stage 2 of all (the same order of kernel calls as on the real kernel)."""
    from liveupdate.emulator import Emulator

    emu = Emulator()
    numbers = trace_numbers if trace_numbers is not None else list(range(len(traces)))
    runners = [TraceRunner(k, ops, emu.open) for k, ops in zip(numbers, traces)]
    records = run_stage(runners, 1)
    emu.kexec()
    for runner in runners:
        runner.drop()
    records += run_stage(runners, 2)
    return records
