"""The manager's notify socket: what systemd does with an sd_notify message
(service_notify_message()), for the keys the emulated manager plays.

``READY=1`` marks the service started; ``FDSTORE=1`` stores the fds that
came with the message under ``FDNAME=`` ("stored" without one), watched
for hang-ups unless ``FDPOLL=0``; ``FDSTOREREMOVE=1`` drops every entry of
``FDNAME=``; ``BARRIER=1`` is answered by closing its fd. Every other fd
that comes along is closed, as systemd closes fds it was not asked to keep.
A message from a process the unit's ``NotifyAccess=`` does not admit is
dropped with its fds, with systemd's warning.
"""
from __future__ import annotations

import array
import logging
import os
import socket
import struct
from typing import Dict, List, Optional, Tuple

__all__ = ["NotifySocket", "Message", "parse"]

log = logging.getLogger("liveupdate.emulator.systemd")

_MESSAGE_MAX = 4096
_FDS_MAX = 768  # systemd's own limit on the fds of one notify message
_UCRED = struct.Struct("3i")


def fdname_is_valid(name: str) -> bool:
    """systemd's check of an FDNAME=: printable ASCII without ':', at most
    255 characters (the empty name passes; systemd then says "stored")."""
    return len(name) <= 255 and all(" " <= ch < "\x7f" and ch != ":" for ch in name)


class Message:
    """One notify datagram: its fields, the sender and its fds (owned)."""

    def __init__(self, fields: Dict[str, str], pid: int, fds: List[int]) -> None:
        self.fields = fields
        self.pid = pid
        self.fds = fds

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def parse(data: bytes) -> Dict[str, str]:
    """The KEY=VALUE lines of a message; the last value of a key wins."""
    fields: Dict[str, str] = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


class NotifySocket:
    """A datagram socket that takes sd_notify messages with their sender's
    credentials (SO_PASSCRED), as /run/systemd/notify does."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        os.chmod(path, 0o600)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> Optional[Message]:
        """The next message, or None when none is waiting."""
        space = socket.CMSG_SPACE(_FDS_MAX * array.array("i").itemsize) + socket.CMSG_SPACE(_UCRED.size)
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(_MESSAGE_MAX, space, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        fds: List[int] = []
        pid = 0
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
            elif (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                pid = _UCRED.unpack_from(payload)[0]
        message = Message(parse(data), pid, fds)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            log.warning("Got truncated notification message from PID %d, ignoring.", pid)
            message.close_fds()
            return None
        return message

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def admitted(access: str, main_pid: Optional[int], sender: int) -> Tuple[bool, str]:
    """Whether ``NotifyAccess=access`` admits a message from ``sender``."""
    if access == "none":
        return False, "Got notification message from PID %d, but reception is disabled." % sender
    if access == "main" and sender != main_pid:
        return False, ("Got notification message from PID %d, but reception only permitted for main PID %s."
                       % (sender, main_pid))
    if access in ("exec", "all") and main_pid is not None and not _descends(sender, main_pid):
        return False, "Got notification message from PID %d, which is not part of the unit." % sender
    return True, ""


def _descends(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (the
    unit's cgroup, as near as a process without cgroups can tell)."""
    for _ in range(4096):  # bounded: a pid chain is never that long
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read(4096)
        except OSError:
            return False
        pid = int(stat[stat.rindex(b")") + 2:].split()[1])
    return False
