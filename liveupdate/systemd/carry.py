"""Carrying a session's files into the next kernel, boot after boot.

The kernel hands a session over once: at a kexec it serializes the
*outgoing* sessions only, so a session retrieved after a kexec (an
*incoming* one) is gone at the next kexec, even while systemd still holds it
in the service's fd store (measured under systemd 262.1: a stored session
and a ``LUOSession=`` session both lose their files at the second kexec).
A service that wants its files in a third kernel must, on every boot, move
them out of the incoming session into a new outgoing one. The kernel
refuses to preserve a file that an unfinished session still holds (EBUSY),
so the old session must be finished first, and between that finish and the
new preserve the files are held only by open fds. :func:`carry_session`
closes that gap with systemd's fd store: the files are parked there, named,
while they are in no session, next to a small manifest that says which
session they belong to.

systemd handles one notify message's ``FDSTORE=1`` before its
``FDSTOREREMOVE=1`` (tried on 262.1: the pair in one message empties the
entry), so an entry cannot be replaced in one step; the parked files are
what makes the gap between removing the old entry and storing the new one
safe.
"""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, MutableMapping, Optional, Tuple

from .. import errors
from ..device import Device
from ..session import Session
from .fdstore import check_fdname, remove_fd, store_capacity, store_fd
from .listen import listen_fds
from .notify import DEFAULT_TIMEOUT, NO_SOCKET_HINT, barrier, deadline_after, notify_socket

__all__ = ["Carried", "carry_session", "parked_name", "manifest_name", "unfinished_carries"]

_MANIFEST_VERSION = 1
_MANIFEST_MAX = 64 * 1024
_F_ADD_SEALS = 1033
_SEALS = 0x0001 | 0x0002 | 0x0004 | 0x0008  # SEAL, SHRINK, GROW, WRITE


@dataclass
class Carried:
    """The result of :func:`carry_session`: the new outgoing ``session``
    (in the fd store under the name given) and the files, ``fds[token]``,
    as fds the caller owns (the session keeps the files; close the fds when
    done with them, e.g. with :meth:`close`)."""

    session: Session
    fds: Dict[int, int] = field(default_factory=dict)

    def close(self) -> None:
        """Close the fds (not the session)."""
        while self.fds:
            _, fd = self.fds.popitem()
            os.close(fd)


def parked_name(name: str, token: int) -> str:
    """The fd store name under which :func:`carry_session` parks the file
    of ``token`` while it is in no session."""
    return f"{name}.carry.{token}"


def manifest_name(name: str) -> str:
    """The fd store name of a carry's manifest (a sealed memfd of JSON)."""
    return f"{name}.carry"


def _read_manifest(fd: int) -> Optional[Tuple[bytes, List[int]]]:
    try:
        data = os.pread(fd, _MANIFEST_MAX + 1, 0)
        doc = json.loads(data.decode("ascii")) if len(data) <= _MANIFEST_MAX else None
        if not isinstance(doc, dict) or doc.get("version") != _MANIFEST_VERSION:
            return None
        kernel_name = bytes.fromhex(doc["session"])
        tokens = [int(t) for t in doc["tokens"] if isinstance(t, int) and 0 <= t < 2**64]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return kernel_name, tokens


def _parked(name: str, environ: Optional[MutableMapping[str, str]]) -> Tuple[Dict[int, int], Optional[int]]:
    """The files a carry parked and its manifest fd, found in LISTEN_FDS."""
    prefix = name + ".carry."
    files: Dict[int, int] = {}
    manifest: Optional[int] = None
    for entry in listen_fds(environ=environ):
        if entry.name == manifest_name(name):
            manifest = entry.fd if manifest is None else manifest
            continue
        suffix = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if suffix.isascii() and suffix.isdigit() and len(suffix) <= 20:
            files.setdefault(int(suffix), entry.fd)
    return files, manifest


def unfinished_carries(environ: Optional[MutableMapping[str, str]] = None) -> List[str]:
    """The fd store names whose carry was cut short (its manifest is still
    in the fd store): call :func:`carry_session` for each again to finish
    it. Part of :func:`find_sessions`' result, as ``unfinished``."""
    suffix = ".carry"
    return sorted({entry.name[: -len(suffix)] for entry in listen_fds(environ=environ)
                   if entry.name.endswith(suffix) and len(entry.name) > len(suffix)})


def _tokens(tokens: Iterable[int]) -> List[int]:
    out: List[int] = []
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < 2**64:
            raise errors.make(errno.EINVAL, "carry_session", "a token is an unsigned 64-bit number", token=token)
        if token not in out:
            out.append(token)
    return out


def _manifest_memfd(kernel_name: bytes, tokens: List[int]) -> int:
    doc = {"version": _MANIFEST_VERSION, "session": kernel_name.hex(), "tokens": tokens}
    fd = os.memfd_create("liveupdate-carry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, json.dumps(doc).encode("ascii"))
        import fcntl

        fcntl.fcntl(fd, _F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _retrieve(session: Optional[Session], token: int, parked: Mapping[int, int]) -> int:
    if session is not None and session.state != "outgoing":
        try:
            return session.retrieve(token)
        except OSError as exc:
            # A carry that died after finishing the old session left the
            # file parked in the fd store: the same file, under its token.
            if token not in parked or exc.errno not in (errno.ENOENT, errno.EINVAL):
                raise
    if token in parked:
        return os.dup(parked[token])
    raise errors.make(errno.ENOENT, "carry_session", "the file is neither in the session nor parked",
                      token=token)


def carry_session(
    session: Optional[Session],
    tokens: Iterable[int],
    *,
    name: str,
    device: Optional[Device] = None,
    store: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    environ: Optional[MutableMapping[str, str]] = None,
) -> Carried:
    """Move the files of an incoming ``session`` (the ``tokens`` it holds)
    into a new outgoing session of the same kernel name, put that session
    in systemd's fd store under ``name`` in place of the old one, and
    finish the old one. No data is copied: the new session preserves the
    very same files. Call it once per boot, after a kexec, for each session
    whose files must reach the next kernel too, whether the service stored
    the session itself (:func:`store_session`) or systemd made it
    (``LUOSession=name``).

    The steps, and what the fd store holds if the process dies after each:

    1. retrieve every token: the old session, untouched (a restart finds
       everything as before);
    2. park each file as ``NAME.carry.TOKEN`` (:func:`parked_name`) and a
       manifest as ``NAME.carry``, then a barrier: the old session and the
       parked files;
    3. finish the old session: its files are no longer preserved by it,
       but systemd holds them, parked (and would preserve them itself at a
       kexec);
    4. create the new session (the old one's kernel name, so that a
       ``LUOSession=`` mapping stays right) and preserve each file at its
       token: as 3; the new session dies with the process;
    5. drop the old entry ``name``, store the new session under it, then a
       barrier: from the drop on, the parked files; then the new session;
    6. drop the manifest, then the parked files: the new session (and,
       until this step ends, parked files nobody needs).

    After a death at any step, the restarted service finds the manifest
    (``find_sessions().unfinished``) and calls ``carry_session`` again,
    with the session it finds under ``name`` (incoming, finished or not,
    or the new outgoing one) or with None (after a death inside step 5):
    files it cannot retrieve any more are taken from the parked entries,
    and the kernel name from the manifest.

    The fd store needs room for the parked files: at least
    ``len(tokens) + 1`` free entries (``FileDescriptorStoreMax=``).

    ``device``: an open :class:`~liveupdate.Device` to create the session
    on; by default the device of the session's backend is opened for the
    create and closed right after (systemd opens ``/dev/liveupdate`` at
    every start of a ``LUOSession=`` unit and fails that start if another
    process holds it). ``store=False`` skips the fd store (steps 2, 5, 6)
    for a process not run by systemd; the files are then held only by this
    process between steps 3 and 4. ``timeout`` bounds each wait for systemd
    and for the device.

    Returns a :class:`Carried`: the new session and the files' fds.

    Raises OSError: EINVAL (``session`` is outgoing with no carry to
    finish, a bad token or name), ENOENT (a token neither in the session
    nor parked; no session and no manifest), ENXIO (``store`` but not run
    by systemd), ENOSPC (the fd store is too small to park the files),
    EBUSY (the device is held elsewhere for longer than ``timeout``), and
    the errors of the session calls and of :func:`store_fd`. On a failure
    before step 3 the parked files are dropped again and nothing has
    changed; after it, see the steps above. With ``store=False`` the
    error's ``fds`` attribute then holds the files' fds, the caller's to
    keep."""
    check_fdname(name, "carry_session")
    wanted = _tokens(tokens)
    deadline_after(timeout, "carry_session")
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    if store and notify_socket(env) is None:
        raise errors.make(errno.ENXIO, "carry_session", NO_SOCKET_HINT, name=name)
    parked, manifest_fd = _parked(name, env) if store else ({}, None)
    manifest = _read_manifest(manifest_fd) if manifest_fd is not None else None
    if session is None:
        if manifest is None:
            raise errors.make(errno.ENOENT, "carry_session",
                              "no session to carry and no unfinished carry under this name", name=name)
        kernel_name = manifest[0]
    else:
        kernel_name = session.name_bytes
        if session.state == "outgoing" and manifest is None:
            raise errors.make(errno.EINVAL, "carry_session",
                              "the session is outgoing: the kernel hands it over at the next kexec as it is; "
                              "only an incoming session (after a kexec) needs carrying",
                              session=session.name, name=name)
    if session is not None and session.state == "outgoing":
        # The carry died after storing its new session: only the clean-up
        # (step 6) is left; the parked fds are the session's very files.
        moved = {token: _retrieve(None, token, parked) for token in wanted}
        _unpark(name, sorted(set(wanted) | set(parked)), timeout, env)
        return Carried(session, moved)
    if store:
        capacity = store_capacity(env)
        in_use = len(listen_fds(environ=env))
        need = len([t for t in wanted if t not in parked]) + (0 if manifest_fd is not None else 1)
        if capacity and in_use + need > capacity:
            raise errors.make(errno.ENOSPC, "carry_session",
                              f"the fd store (FileDescriptorStoreMax={capacity}, {in_use} in use) has no room "
                              f"to park {need} file(s) while they move; raise FileDescriptorStoreMax= to at "
                              f"least {in_use + need}", name=name)
    fds: Dict[int, int] = {}
    finished = False
    try:
        for token in wanted:                                    # step 1
            fds[token] = _retrieve(session, token, parked)
        if store:                                               # step 2
            _park(name, kernel_name, wanted, fds, parked, manifest_fd, timeout, env)
        if session is not None:                                 # step 3
            session.finish()
        finished = True
        new = _create(session, kernel_name, device, timeout)    # step 4
        try:
            for token in wanted:
                new.preserve(fds[token], token)
            if store:                                           # step 5
                remove_fd(name, timeout=timeout, environ=env)
                store_fd(new, name, poll=False, timeout=timeout, environ=env)
                barrier(timeout, environ=env)
        except BaseException:
            new.close()
            raise
    except BaseException as exc:
        if store and not finished:
            _unpark(name, wanted, timeout, env)
        if finished and not store:
            # The files are in no session now and nobody else holds them:
            # closing these fds would lose them. They go with the error.
            if isinstance(exc, OSError):
                exc.fds = fds  # type: ignore[attr-defined]
            raise
        for fd in fds.values():
            os.close(fd)
        raise
    if store:                                                   # step 6
        _unpark(name, sorted(set(wanted) | set(parked)), timeout, env)
    if session is not None:
        session.close()
    return Carried(new, fds)


def _park(name: str, kernel_name: bytes, wanted: List[int], fds: Mapping[int, int],
          parked: Mapping[int, int], manifest_fd: Optional[int], timeout: float,
          env: MutableMapping[str, str]) -> None:
    if manifest_fd is None:
        fd = _manifest_memfd(kernel_name, wanted)
        try:
            store_fd(fd, manifest_name(name), poll=False, timeout=timeout, environ=env)
        finally:
            os.close(fd)
    for token in wanted:
        if token not in parked:
            store_fd(fds[token], parked_name(name, token), poll=False, timeout=timeout, environ=env)
    barrier(timeout, environ=env)


def _create(old: Optional[Session], kernel_name: bytes, device: Optional[Device], timeout: float) -> Session:
    if device is not None:
        return device.create_session(kernel_name)
    wait = min(timeout, 3600.0)
    opened: Optional[Device] = None
    if old is not None:
        # The session's own backend: a session of the kernel is carried on
        # /dev/liveupdate, one of an emulator on that emulator. A port that
        # only knows adopted fds (an emulator service's) says ENODEV.
        try:
            opened = Device._open_port(old._port, timeout=wait)
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise
    if opened is None:
        from .. import open as open_device

        opened = open_device(timeout=wait)
    try:
        return opened.create_session(kernel_name)
    finally:
        opened.close()


def _unpark(name: str, tokens: Iterable[int], timeout: float, env: MutableMapping[str, str]) -> None:
    # The manifest goes first: once it is gone the carry is over, and a
    # death halfway through leaves only parked files, which the next carry
    # (or systemd, at the next kexec) drops.
    try:
        remove_fd(manifest_name(name), timeout=timeout, environ=env)
        for token in tokens:
            remove_fd(parked_name(name, token), timeout=timeout, environ=env)
        barrier(timeout, environ=env)
    except OSError:
        # Leftover parked files are harmless: their files are preserved in
        # the new session, and systemd drops them at the next kexec (its
        # own preserve of them fails with EBUSY) or the next carry.
        pass
