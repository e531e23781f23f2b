"""A stand-in for systemd's fd store, as systemd 262.1 behaves (measured in
the systemd tier): a notify socket served by a thread, FDSTORE=1 adding
(newest first, an fd of a file already stored ignored), FDSTOREREMOVE=1
removing every entry of a name, FDSTORE handled before FDSTOREREMOVE in
one message, BARRIER=1 answered by closing its fd. ``listen_env`` gives
what a restarted service would see; ``after_kexec`` plays systemd's part
of an (emulated) kexec for the sessions in the store."""
from __future__ import annotations

import array
import os
import socket
import threading
from typing import Callable, Dict, List, Optional, Tuple


class FakeFdStore:
    def __init__(self, path: str, capacity: int = 16) -> None:
        self.path = path
        self.capacity = capacity
        self.entries: List[Tuple[str, int]] = []  # newest first, as systemd lists them
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def env(self) -> Dict[str, str]:
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": str(self.capacity)}

    def names(self) -> List[str]:
        with self.lock:
            return [name for name, _ in self.entries]

    def _serve(self) -> None:
        size = array.array("i").itemsize
        while self.running:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * size))
            except socket.timeout:
                continue
            except OSError:
                return
            fds: List[int] = []
            for level, kind, payload in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % size])
                    fds.extend(got)
            self._handle(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line), fds)

    def _handle(self, msg: Dict[str, str], fds: List[int]) -> None:
        with self.lock:
            name = msg.get("FDNAME", "stored")
            if msg.get("FDSTORE") == "1":
                for fd in fds:
                    if any(_same(fd, old) for _, old in self.entries) or len(self.entries) >= self.capacity:
                        os.close(fd)
                    else:
                        self.entries.insert(0, (name, fd))
                fds = []
            if msg.get("FDSTOREREMOVE") == "1":
                for entry in [e for e in self.entries if e[0] == name]:
                    self.entries.remove(entry)
                    os.close(entry[1])
        for fd in fds:  # BARRIER=1's pipe, or fds nobody asked to store
            os.close(fd)

    def listen(self) -> Tuple[List[int], List[str]]:
        """The fds and names a (re)started service gets, in order."""
        with self.lock:
            return [fd for _, fd in self.entries], [name for name, _ in self.entries]

    def kexec(self, do_kexec: Callable[[], object], retrieve_session: Callable[[bytes], Optional[int]]) -> None:
        """systemd's side of an (emulated) kexec: before it, the kernel name
        of each stored session is read; after it, each is handed back by
        that name (``retrieve_session`` gives the new fd, or None when the
        kernel did not hand it over, and systemd then drops the entry).
        Other fds are kept as they are (systemd preserves memfds in its own
        session; this stand-in does not need to). The order reverses, as
        systemd's re-insertion from its mapping does."""
        with self.lock:
            old, self.entries = self.entries, []
            names = [_kernel_name(fd) for _, fd in old]
        do_kexec()
        with self.lock:
            for (name, fd), kernel_name in zip(old, names):
                new: Optional[int] = fd
                if kernel_name is not None:
                    os.close(fd)
                    new = retrieve_session(kernel_name)
                if new is not None:
                    self.entries.insert(0, (name, new))

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()
        with self.lock:
            for _, fd in self.entries:
                os.close(fd)
            self.entries = []


def _same(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and os.readlink(f"/proc/self/fd/{a}") == \
        os.readlink(f"/proc/self/fd/{b}")


def _kernel_name(fd: int) -> Optional[bytes]:
    from liveupdate import Session

    try:
        session = Session.from_fd(os.dup(fd))
    except OSError:
        return None
    with session:
        return session.name_bytes
