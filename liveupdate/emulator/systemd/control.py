"""How ``liveupdate emulator kexec`` reaches the emulated service managers
that run over the same emulator service, so that one kexec command does
systemd's part too, as ``systemctl kexec`` does on a real machine.

Each manager run by ``liveupdate emulator systemd`` listens on a control
socket in a directory next to the emulator service's socket
(``SOCKET.systemd.d/PID.sock``, 0700). The kexec command asks each to
prepare (stop its services, preserve their fd stores in the ``systemd``
session), runs the emulated kexec, then asks each to finish (retrieve the
session, hand the fds back, start the units) or, if the kexec failed, to
abort. Both ends check who is at the other end (SO_PEERCRED: this uid or
root), as the emulator service's own clients do.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import threading
from typing import Any, Callable, Dict, List, Optional

from ...errors import make

__all__ = ["registry", "ControlServer", "kexec_with_managers"]

log = logging.getLogger("liveupdate.emulator.systemd")

_MAX = 1 << 20
_UCRED = struct.Struct("3i")
_TIMEOUT = 300.0


def registry(service_socket: str) -> str:
    """The directory of the managers' control sockets for ``service_socket``."""
    return os.path.abspath(service_socket) + ".systemd.d"


def _peer_uid(sock: socket.socket) -> int:
    uid: int = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
    return uid


def _trusted(uid: int) -> bool:
    return uid in (0, os.getuid())


def _send(sock: socket.socket, doc: Dict[str, Any]) -> None:
    sock.sendall(json.dumps(doc, default=str).encode("utf-8"))


def _receive(sock: socket.socket) -> Dict[str, Any]:
    data = sock.recv(_MAX)
    if not data:
        raise OSError(errno.ECONNRESET, "the other end went away")
    doc = json.loads(data.decode("utf-8"))
    if not isinstance(doc, dict):
        raise OSError(errno.EPROTO, "not a control message")
    return doc


class ControlServer:
    """The manager's end: a thread answering prepare/finish/abort/status."""

    def __init__(self, manager: Any, service_socket: str) -> None:
        self.manager = manager
        directory = registry(service_socket)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
        if not _trusted(st.st_uid) or st.st_mode & 0o077:
            raise make(errno.EACCES, "liveupdate emulator systemd", "the control directory belongs to uid "
                       f"{st.st_uid} or is open to others", path=directory)
        self.path = os.path.join(directory, f"{os.getpid()}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        if os.path.lexists(self.path):
            os.unlink(self.path)  # a manager of this pid that died
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(4)
        self._prepared: Optional[Dict[str, Any]] = None
        self._thread = threading.Thread(target=self._serve, name="liveupdate-systemd-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    if not _trusted(_peer_uid(conn)):
                        _send(conn, {"ok": False, "errno": errno.EACCES})
                        continue
                    while True:
                        _send(conn, self._answer(_receive(conn)))
                except (OSError, ValueError):
                    continue

    def _answer(self, request: Dict[str, Any]) -> Dict[str, Any]:
        op = request.get("op")
        try:
            if op == "prepare":
                self._prepared = self.manager.prepare_kexec()
                return {"ok": True}
            if op == "finish":
                prepared, self._prepared = self._prepared, None
                report = self.manager.finish_kexec(prepared or {"mapping": None, "lost": []})
                return {"ok": True, "report": report}
            if op == "abort":
                self._prepared = None
                self.manager.abort_kexec()
                return {"ok": True}
            if op == "status":
                return {"ok": True, "units": {n: s.state for n, s in self.manager.services.items()},
                        "kexecs": self.manager.kexecs}
        except OSError as exc:
            return {"ok": False, "errno": exc.errno, "error": str(exc)}
        return {"ok": False, "errno": errno.EINVAL, "error": f"unknown op {op!r}"}

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


class _Peer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(_TIMEOUT)
        self.sock.connect(path)
        uid = _peer_uid(self.sock)
        if not _trusted(uid):
            self.sock.close()
            raise make(errno.EACCES, "kexec", f"the emulated systemd at {path} runs as uid {uid}, not as this "
                                              "user or root: not trusted with the kexec", path=path)

    def ask(self, op: str) -> Dict[str, Any]:
        _send(self.sock, {"op": op})
        answer = _receive(self.sock)
        if not answer.get("ok"):
            raise make(int(answer.get("errno") or errno.EIO), "kexec",
                       f"the emulated systemd at {self.path} could not {op}: {answer.get('error', '')}")
        return answer


def kexec_with_managers(service_socket: str, do_kexec: Callable[[], Any],
                        say: Callable[[str], None] = lambda _: None) -> Any:
    """Run ``do_kexec`` (the emulated kernel's kexec) with every emulated
    systemd of ``service_socket`` doing its part before and after. Returns
    ``do_kexec``'s result. Managers that are gone are skipped (their stale
    sockets removed)."""
    directory = registry(service_socket)
    peers: List[_Peer] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        names = []
    for name in names[:1024]:
        path = os.path.join(directory, name)
        if not name.endswith(".sock"):
            continue
        try:
            peers.append(_Peer(path))
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)
            except OSError:
                pass
    try:
        for peer in peers:
            peer.ask("prepare")
            say(f"emulated systemd ({peer.path}): services stopped, fd stores preserved in session 'systemd'")
        try:
            result = do_kexec()
        except BaseException:
            for peer in peers:
                try:
                    peer.ask("abort")
                except OSError:
                    pass
            raise
        for peer in peers:
            report = peer.ask("finish")["report"]
            lost = report.get("lost", [])
            say(f"emulated systemd ({peer.path}): fd stores restored, KExecCount={report.get('kexecs')}"
                + (f"; lost: {', '.join(x['unit'] + '/' + x['name'] for x in lost)}" if lost else ""))
        return result
    finally:
        for peer in peers:
            peer.sock.close()
