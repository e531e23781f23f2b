"""An emulated service manager: the part of systemd 262 that takes part in a
live update, over an emulated kernel, for daemons tested where there is no
LUO kernel and no systemd 262.

It runs real service processes from real unit files (the keys
:mod:`.unit_file` plays), serves their sd_notify messages and keeps their fd
stores, restarts them, and at :meth:`EmulatedSystemd.kexec` does what
``systemctl kexec`` does: stop every service, carry the fd stores through
the kexec in the ``systemd`` session (:mod:`.luo`), boot the emulated
kernel anew, hand each unit its fds back and start the enabled units.

The emulated kernel is an emulator service (services are processes, so the
kernel they share must be one too): the one at ``socket=`` (its clients
must be this uid), or, by default, one this object runs in a thread over an
in-process :class:`~liveupdate.Emulator` (``emulator=``, or a new one), so
that a test can also look at that emulator (``walk()``, ``save_image``)
while no service runs.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple, Union

from ... import errors
from .fdstore import FdStore
from .luo import preserve_fd_stores, restore_fd_stores, serialize_fd_stores, session_name_of
from .notify import NotifySocket, admitted, fdname_is_valid
from .service import Service
from .unit_file import Unit, load_unit, parse_unit

__all__ = ["EmulatedSystemd"]

log = logging.getLogger("liveupdate.emulator.systemd")

_ENABLING_TARGETS = ("multi-user.target", "default.target", "graphical.target")


class _InThreadService:
    """An emulator service over an in-process Emulator, served by a thread
    of this process."""

    def __init__(self, emulator: Any, directory: str) -> None:
        from ...service.kernel import Kernel
        from ...service.server import Server

        self.socket = os.path.join(directory, "emulator.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(self.socket)
        os.chmod(self.socket, 0o600)
        listener.listen(64)
        self.emulator = emulator
        self.server = Server(Kernel(emulator_class=lambda: emulator), listener, [os.getuid()])
        self.thread = threading.Thread(target=self.server.serve_forever, name="liveupdate-emulator", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stop()
        self.thread.join(30)
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass


class EmulatedSystemd:
    """systemd's Live Update part, emulated (see the module).

    ``directory`` holds the notify socket and one log file per unit (the
    services' stdout and stderr); by default a new temporary directory.
    ``env`` is the environment services start from (default: this
    process's, without systemd's own variables)."""

    def __init__(self, *, emulator: Any = None, socket: Optional[str] = None,
                 directory: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 start_timeout: float = 60.0) -> None:
        if emulator is not None and socket is not None:
            raise ValueError("give emulator= or socket=, not both")
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="liveupdate-systemd-")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._inthread: Optional[_InThreadService] = None
        if socket is None:
            if emulator is None:
                from .. import Emulator

                emulator = Emulator()
            self._inthread = _InThreadService(emulator, self.directory)
            socket = self._inthread.socket
        self.socket = os.path.abspath(socket)
        self.emulator = emulator
        self.start_timeout = start_timeout
        self.kexecs = 0
        self._systemd_session: Any = None  # between prepare_kexec and finish_kexec
        self.services: Dict[str, Service] = {}
        # Fd stores of units the mapping named but that are not loaded
        # (systemd loads them eagerly; here they wait for load()).
        self._orphans: Dict[str, List[Tuple[str, int]]] = {}
        base = dict(os.environ if env is None else env)
        for key in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "FDSTORE"):
            base.pop(key, None)
        base["LIVEUPDATE_EMULATOR"] = self.socket
        base["LIVEUPDATE_BACKEND"] = "service"
        self.env = base
        self.notify_path = os.path.join(self.directory, "notify")
        self._notify = NotifySocket(self.notify_path)
        self._lock = threading.RLock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._running = True
        self._loop = threading.Thread(target=self._serve, name="liveupdate-systemd", daemon=True)
        self._loop.start()

    # -- units ----------------------------------------------------------------

    def load(self, unit: "Union[str, os.PathLike[str]]", name: Optional[str] = None) -> Unit:
        """Load a unit from a file path, or from its text (then ``name`` is
        required). Loading it again replaces its configuration; its fd store
        stays. Raises OSError EINVAL for what the manager does not play."""
        text = os.fspath(unit)
        if "\n" in text or "[" in text:
            if name is None:
                raise errors.make(errno.EINVAL, "load_unit", "a unit given as text needs name=")
            parsed = parse_unit(text, name)
        else:
            parsed = load_unit(text, name)
        with self._lock:
            old = self.services.get(parsed.name)
            service = Service(parsed, self.directory)
            if old is not None:
                service.store = old.store
                service.store.capacity = parsed.effective_fd_store_max
                service.pid, service.pidfd, service.state = old.pid, old.pidfd, old.state
            for fdname, fd in self._orphans.pop(parsed.name, []):
                service.store.add(fd, fdname)
            self.services[parsed.name] = service
        return parsed

    def _service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            raise errors.make(errno.ENOENT, "unit", "no such unit loaded", unit=name) from None

    def _open_device(self) -> Any:
        from ... import open as open_device

        return open_device(backend="service", emulator=self.socket)

    def start(self, name: str, timeout: Optional[float] = None) -> None:
        """Start a unit and wait until it is started (READY=1 for
        Type=notify). Raises OSError: EBUSY (a LUOSession= unit while the
        device is held), ENOENT, ETIMEDOUT, ECHILD (the process exited
        before it was ready; its log is in ``log(name)``)."""
        with self._lock:
            service = self._service(name)
            if service.pid is not None:
                return
            service.spawn(self.env, self.notify_path, self._open_device)
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while True:
            with self._lock:
                if service.state == "active":
                    return
                if service.pid is None:
                    service.state = "failed"
                    raise errors.make(errno.ECHILD, "start", f"the service exited with {service.exit_status} "
                                      f"before it was ready; see {service.log_path}", unit=name)
            if time.monotonic() > deadline:
                raise errors.make(errno.ETIMEDOUT, "start", "no READY=1 in time", unit=name)
            time.sleep(0.01)

    def stop(self, name: str, timeout: float = 10.0, restarting: bool = False) -> None:
        """Stop a unit (SIGTERM, then SIGKILL); its fd store is released
        unless FileDescriptorStorePreserve= keeps it (or a restart does)."""
        with self._lock:
            service = self._service(name)
        service.terminate(timeout)
        with self._lock:
            service.state = "inactive"
            if not restarting and service.unit.fd_store_preserve in ("no", "restart"):
                service.store.release()

    def restart(self, name: str, timeout: Optional[float] = None) -> None:
        """Stop and start again, the fd store kept (a restart job)."""
        self.stop(name, restarting=True)
        self.start(name, timeout)

    def fd_store(self, name: str) -> List[Tuple[str, str]]:
        """(name, what it is) of each entry, newest first, as
        ``systemd-analyze fdstore`` lists them."""
        with self._lock:
            entries = [(e.name, e.fd) for e in self._service(name).store.entries]
            out = []
            for fdname, fd in entries:
                kernel = session_name_of(fd)
                out.append((fdname, f"session {kernel}" if kernel else os.readlink(f"/proc/self/fd/{fd}")))
            return out

    def check(self, name: str, probe: bool = True) -> Any:
        """What of the unit's fd store the next :meth:`kexec` keeps, judged
        as ``liveupdate check`` judges it on a real machine (a
        :class:`liveupdate.systemd.check.UnitCheck`)."""
        from ...systemd.check import judge

        with self._lock:
            service = self._service(name)
            stored = [(e.name, os.readlink(f"/proc/self/fd/{e.fd}"), os.dup(e.fd), "") for e in service.store.entries]
            return judge(name, service.unit.fd_store_preserve, stored, self._open_device if probe else None)

    def log(self, name: str) -> str:
        with open(self._service(name).log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def enabled(self) -> List[str]:
        """Units wanted by a boot target, in an order that honours After=."""
        wanted = [n for n, s in self.services.items() if set(s.unit.wanted_by) & set(_ENABLING_TARGETS)]
        ordered: List[str] = []
        for _ in range(len(wanted) + 1):
            for n in wanted:
                if n not in ordered and all(a not in wanted or a in ordered for a in self.services[n].unit.after):
                    ordered.append(n)
        return ordered + [n for n in wanted if n not in ordered]

    # -- the notify loop ------------------------------------------------------

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._notify.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while self._running:
            poller.poll(200)
            with self._lock:
                while True:
                    message = self._notify.receive()
                    if message is None:
                        break
                    self._handle(message)
                for service in self.services.values():
                    if service.pid is not None and service.reap() is not None and service.state != "deactivating":
                        service.state = "inactive" if service.ready else "failed"
                    service.store.drop_hung_up()

    def _handle(self, message: Any) -> None:
        service = next((s for s in self.services.values() if s.pid is not None and _owns(s, message.pid)), None)
        if service is None:
            log.warning("Cannot find unit for notify message of PID %d, ignoring.", message.pid)
            message.close_fds()
            return
        ok, why = admitted(service.unit.effective_notify_access, service.pid, message.pid)
        if not ok:
            log.warning("%s: %s", service.name, why)
            message.close_fds()
            return
        fields = message.fields
        if fields.get("READY") == "1":
            service.ready = True
            service.state = "active"
        name = fields.get("FDNAME", "")
        if fields.get("FDSTORE") == "1":
            if service.store.capacity == 0:
                log.warning("%s: Got notification message with file descriptors, but the fd store is disabled "
                            "(FileDescriptorStoreMax=0), closing.", service.name)
            elif not fdname_is_valid(name):
                log.warning("%s: Passed FDNAME= name is invalid, ignoring.", service.name)
            else:
                while message.fds:
                    service.store.add(message.fds.pop(0), name or "stored", fields.get("FDPOLL") != "0")
        if fields.get("FDSTOREREMOVE") == "1":
            if name and fdname_is_valid(name):
                service.store.remove(name)
            else:
                log.warning("%s: FDSTOREREMOVE=1 requested, but no valid FDNAME= given, ignoring.", service.name)
        # BARRIER=1's fd, and any fd nobody asked to keep, are closed.
        message.close_fds()

    # -- the live update --------------------------------------------------------

    def kexec(self) -> Dict[str, Any]:
        """``systemctl kexec``, emulated: :meth:`prepare_kexec`, the
        emulated kernel's kexec, :meth:`finish_kexec`. Returns what
        happened: ``mapping`` (the JSON systemd's session carried),
        ``lost`` (what could not be preserved or retrieved, with systemd's
        warnings) and ``kexecs`` (the manager's KExecCount now).

        Raises OSError: EBUSY (another process holds the emulated device),
        and what the emulated kexec raises (the old kernel then runs on,
        and the units start again); KernelPanic when the new kernel does
        not boot."""
        from ...service import client as service_client

        prepared = self.prepare_kexec()
        try:
            service_client.kexec(self.socket)
        except BaseException:
            self.abort_kexec()
            raise
        return self.finish_kexec(prepared)

    def prepare_kexec(self) -> Dict[str, Any]:
        """Everything before the kernel's kexec: stop every service, drop
        the stores that are not carried, write the mapping and preserve the
        fds in the ``systemd`` session (kept open until :meth:`finish_kexec`)."""
        with self._lock:
            running = [n for n, s in self.services.items() if s.pid is not None]
        for name in running:
            self.stop(name)
        with self._lock:
            if self._systemd_session is not None:
                raise errors.make(errno.EALREADY, "kexec", "a kexec is already prepared")
            stores = [(n, s.unit.carried_through_kexec, [(e.name, e.fd) for e in s.store.entries])
                      for n, s in self.services.items()]
            serialized = serialize_fd_stores(stores, self.kexecs)
            try:
                with self._open_device() as device:
                    self._systemd_session, mapping, lost = preserve_fd_stores(device, serialized)
            finally:
                serialized.close()
        return {"mapping": mapping, "lost": lost}

    def abort_kexec(self) -> None:
        """The kexec did not happen: let go of the ``systemd`` session
        (which preserves nothing once closed) and start the units again."""
        with self._lock:
            if self._systemd_session is not None:
                self._systemd_session.close()
                self._systemd_session = None
        for name in self.enabled():
            self.start(name)

    def finish_kexec(self, prepared: Dict[str, Any]) -> Dict[str, Any]:
        """Everything after the kernel's kexec: the old kernel's fds go, the
        ``systemd`` session is retrieved and each unit gets its fds back,
        then the enabled units start."""
        with self._lock:
            if self._systemd_session is not None:
                self._systemd_session.close()  # a handle of the old kernel: stale
                self._systemd_session = None
            for service in self.services.values():
                service.store.release()
            with self._open_device() as device:
                restored = restore_fd_stores(device, self._dispatch)
            if restored["kexecs"] is not None:
                self.kexecs = restored["kexecs"]
        for name in self.enabled():
            self.start(name)
        return {"mapping": prepared["mapping"], "lost": prepared["lost"] + restored["lost"], "kexecs": self.kexecs}

    def _dispatch(self, unit: str, name: str, fd: int) -> None:
        service = self.services.get(unit)
        if service is None:
            self._orphans.setdefault(unit, []).insert(0, (name, fd))
        else:
            service.store.add(fd, name, poll=False)

    # -- the end --------------------------------------------------------------

    def close(self) -> None:
        """Stop every service, release every fd store, stop the emulated
        kernel this object runs (if it runs one)."""
        for name in list(self.services):
            try:
                self.stop(name, timeout=5.0)
            except OSError:
                pass
        self._running = False
        os.write(self._wake_w, b"x")
        self._loop.join(30)
        with self._lock:
            for service in self.services.values():
                service.store.release()
            for entries in self._orphans.values():
                for _, fd in entries:
                    os.close(fd)
            self._orphans.clear()
        self._notify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._inthread is not None:
            self._inthread.close()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "EmulatedSystemd":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _owns(service: Service, pid: int) -> bool:
    """Whether ``pid`` belongs to the service (its main process or one of
    its descendants: its process group, here)."""
    if pid == service.pid:
        return True
    try:
        return os.getpgid(pid) == service.pid
    except OSError:
        return False


__all__ += ["FdStore"]
