"""One service unit at run time: its process, its fd store, its start.

Starting (service_enter_start() and exec_spawn() in systemd 262) does, in
order: hand out the ``LUOSession=`` sessions missing from the fd store (the
device opened once per start; absent: none handed out; any other error,
EBUSY included: the start fails; a create that fails is logged and
skipped), then spawn the command with the fd store as ``LISTEN_FDS``
(newest first, from fd 3), ``LISTEN_FDNAMES``, ``LISTEN_PID``, ``FDSTORE``
(the store's size) and ``NOTIFY_SOCKET``. A ``Type=notify`` service is
started once it says ``READY=1``; one that exits before fails.

The kernel name of a ``LUOSession=NAME`` session (service_build_luo_session_name(),
read off the 262.1 binary and checked against the real one in the systemd
tier): the unit's first 13 characters, "-", and 24 hex digits of the
SHA-256 of "UNIT/NAME" made a version-4 UUID.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import time
from typing import Any, Callable, Dict, List, Optional

from ...errors import make
from .fdstore import FdStore
from .unit_file import Unit

__all__ = ["Service", "luo_session_kernel_name"]

log = logging.getLogger("liveupdate.emulator.systemd")

# Keeps LISTEN_PID right: the shell's $$ is the pid the command runs as,
# because exec keeps it, and a shell is the one thing that can say it
# between the spawn and the exec of a process spawned without fork().
_WITH_LISTEN_PID = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'
_SH = shutil.which("sh") or "/bin/sh"


def luo_session_kernel_name(unit: str, name: str) -> str:
    """The kernel name systemd 262 gives ``LUOSession=name`` of ``unit``."""
    raw = bytearray(hashlib.sha256(f"{unit}/{name}".encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return f"{unit[:13]}-{raw.hex()[:24]}"


class Service:
    """A unit, its fd store (which outlives its processes) and its process."""

    def __init__(self, unit: Unit, log_dir: str) -> None:
        self.unit = unit
        self.store = FdStore(unit.name, unit.effective_fd_store_max)
        self.log_path = os.path.join(log_dir, unit.name + ".log")
        self.pid: Optional[int] = None
        self.pidfd: Optional[int] = None
        self.state = "inactive"     # activating, active, deactivating, failed
        self.ready = False
        self.exit_status: Optional[int] = None

    @property
    def name(self) -> str:
        return self.unit.name

    def _luo_sessions(self, open_device: Callable[[], Any]) -> None:
        if not self.unit.luo_sessions:
            return
        try:
            device = open_device()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                log.debug("No /dev/liveupdate device found, not handing out LUO sessions.")
                return
            raise make(exc.errno or errno.EIO, "start", f"Failed to open /dev/liveupdate: {os.strerror(exc.errno or 5)}",
                       unit=self.name) from None
        from .luo import session_name_of

        with device:
            for name in self.unit.luo_sessions:
                if any(entry.name == name and session_name_of(entry.fd) is not None for entry in self.store.entries):
                    continue  # handed out before, or restored after a kexec: kept
                kernel_name = luo_session_kernel_name(self.name, name)
                try:
                    session = device.create_session(kernel_name)
                except OSError as exc:
                    log.warning("Failed to create LUO session '%s', ignoring: %s", kernel_name, os.strerror(exc.errno or 5))
                    continue
                fd = session.detach()
                if not self.store.add(fd, name, poll=False):
                    raise make(errno.EXFULL, "start", f"Failed to hand out LUO session '{name}': fd store full",
                               unit=self.name)
                log.debug("Handed out LUO session '%s' (kernel name '%s').", name, kernel_name)

    def spawn(self, env: Dict[str, str], notify_path: str, open_device: Callable[[], Any]) -> int:
        """Hand out sessions, then start the process; returns its pid."""
        self._luo_sessions(open_device)
        fds, names = self.store.listen()
        child_env = dict(env)
        child_env.update(self.unit.environment)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "FDSTORE", "NOTIFY_SOCKET"):
            child_env.pop(key, None)
        if self.unit.effective_notify_access != "none":
            child_env["NOTIFY_SOCKET"] = notify_path
        if self.store.capacity:
            child_env["FDSTORE"] = str(self.store.capacity)
        argv = list(self.unit.exec_start)
        if os.sep not in argv[0]:
            found = shutil.which(argv[0], path=child_env.get("PATH"))
            if found is None:
                raise make(errno.ENOENT, "start", f"{argv[0]!r} is not on $PATH", unit=self.name)
            argv[0] = found
        # The fds go to 3, 4, ... in the child. First they are moved clear of
        # that range here, so that placing one cannot overwrite another.
        lifted = [_dup_above(fd, 3 + len(fds)) for fd in fds]
        actions: List[Any] = []
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                actions += [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, log_fd, 1),
                            (os.POSIX_SPAWN_DUP2, log_fd, 2)]
                actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(lifted)]
                if fds:
                    child_env["LISTEN_FDS"] = str(len(fds))
                    child_env["LISTEN_FDNAMES"] = ":".join(names)
                    argv = [_SH, "-c", _WITH_LISTEN_PID] + argv
                pid = os.posix_spawn(argv[0], argv, child_env, file_actions=actions, setsid=True)
            finally:
                os.close(null)
        finally:
            os.close(log_fd)
            for fd in lifted:
                os.close(fd)
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.ready = False
        self.exit_status = None
        self.state = "activating" if self.unit.type == "notify" else "active"
        return pid

    def reap(self) -> Optional[int]:
        """The exit status once the process is gone (None while it runs)."""
        if self.pid is None:
            return self.exit_status
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == 0:
            return None
        self.exit_status = os.waitstatus_to_exitcode(status)
        self.pid = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return self.exit_status

    def terminate(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds, as systemd stops."""
        if self.pid is None:
            return
        self.state = "deactivating"
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.reap() is not None or self.pid is None:
                    return
                time.sleep(0.01)


def _dup_above(fd: int, low: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
