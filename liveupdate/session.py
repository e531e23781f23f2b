"""A live update session: the files it keeps and the handle that keeps them."""
from __future__ import annotations

import errno
import struct
# Typing names are for annotations only (strings, under the __future__
# import): importing typing would cost every program's start (it pulls in
# re, enum, functools ...), which a daemon's blackout after a kexec includes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional

from . import _abi, _args, _port, errors
from ._handle import Handle

__all__ = ["Session"]

_PRESERVE_FD = _abi.SESSION_PRESERVE_FD
_RETRIEVE_FD = _abi.SESSION_RETRIEVE_FD
_pack_fd_token = _abi.PRESERVE_FD.pack
_unpack_fd_token = _abi.RETRIEVE_FD.unpack
_FD_TOKEN_SIZE = _abi.PRESERVE_FD.size

# "Is this session outgoing or incoming?", asked without side effects: a
# PRESERVE_FD (an outgoing-only command) whose argument claims 1024 bytes,
# the last one non-zero. The kernel checks the session's kind first (EINVAL
# on an incoming session), then refuses non-zero bytes beyond the struct it
# knows (E2BIG on an outgoing one), before the command runs. Should a later
# kernel ever understand that many bytes, fd -1 still makes it EBADF.
_PROBE_SIZE = 1024  # the most fcntl.ioctl() copies in and out
_STATE_PROBE = _pack_fd_token(_PROBE_SIZE, -1, 0) + bytes(_PROBE_SIZE - _FD_TOKEN_SIZE - 1) + b"\x01"
_PROBED_STATE = {errno.E2BIG: "outgoing", errno.EBADF: "outgoing", errno.EINVAL: "incoming"}


class Session(Handle):
    """A session fd of ``/dev/liveupdate`` (or of an emulator).

    Made by :meth:`Device.create_session` (an *outgoing* session: preserve
    files in it, keep it open through the kexec), by
    :meth:`Device.retrieve_session` after a kexec (an *incoming* session:
    retrieve the files, then :meth:`finish`), or by :meth:`from_fd` for a
    session fd received from elsewhere.

    The kernel releases a session when its last fd is closed: an outgoing
    session's files stop being preserved, an incoming session is finished.
    So keep the Session (or its fd) open until the kexec.
    """

    __slots__ = ("_name", "_state")
    _name: "Optional[bytes]"  # as the kernel last said (None until asked, for an adopted fd)
    _state: str
    _kind = "session"

    def __init__(self) -> None:
        raise TypeError("sessions come from Device.create_session(), Device.retrieve_session() "
                        "or Session.from_fd()")

    @staticmethod
    def _adopt(port: _port.Port, fd: int, state: str, name: Optional[bytes]) -> "Session":
        """A Session owning ``fd`` (private: for this package and its tests)."""
        self = _Built()
        self._port = port
        self._fd = fd
        self._name = name
        self._state = state
        return self

    @staticmethod
    def from_fd(fd: int) -> "Session":
        """Adopt a session fd received from elsewhere: inherited, passed with
        SCM_RIGHTS, or handed back by systemd's fd store. The Session owns the
        fd from then on (closing it closes the fd). Works for the kernel's
        session fds and for those of the emulators.

        The kernel tells its two kinds of session apart by a flag user
        space cannot read, so the Session asks it with a command that is
        refused either way, differently for each kind (nothing changes):
        :attr:`state` is then "outgoing" (made in this kernel, e.g. handed
        back by systemd after a plain restart) or "incoming" (handed over
        by the previous kernel, e.g. handed back by systemd after a kexec).
        A finished incoming session still reads "incoming".

        Raises OSError: EBADF (``fd`` is not open), ENOTTY (it is no session)."""
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError(f"Session.from_fd takes an int fd, not {type(fd).__name__} (use its detach() first)")
        try:
            port = _port.recognize(fd)
        except OSError as exc:
            raise errors.wrap(exc, "Session.from_fd", fd=fd) from None
        self = Session._adopt(port, fd, "unknown", None)
        try:
            self._name = self._get_name()
            self._state = self._probe_state()
        except BaseException:
            self._fd = -1  # the caller still owns fd: do not close it
            raise
        return self

    def _probe_state(self) -> str:
        try:
            self._port.ioctl(self._fd, _PRESERVE_FD, _STATE_PROBE)
        except OSError as exc:
            return _PROBED_STATE.get(exc.errno or 0, "unknown")
        return "unknown"  # accepted: a kernel this library does not know

    # -- the four session ioctls ------------------------------------------

    def preserve(self, fd: Any, token: int) -> None:
        """Preserve the file behind ``fd`` (an int or anything with
        ``fileno()``, today a memfd) under ``token`` (0 to 2**64-1) until the
        next kexec. Only on an outgoing session.

        Raises OSError: EEXIST (token already used in this session), EBADF
        (``fd`` not open), ENOENT (no handler for this kind of file: not a
        memfd), EBUSY (the file is already preserved, in any session, through
        any fd of it), EOPNOTSUPP (memfd seals the handler cannot keep),
        EFBIG (file too large), EINVAL (an incoming session), ENOMEM, ENOSPC
        (the kernel's block cap)."""
        if type(fd) is not int:
            fd = _args.fd(fd, "preserve")
        if type(token) is not int or not 0 <= token <= 0xFFFFFFFFFFFFFFFF:
            token = _args.token(token, "preserve")
        try:
            arg = _pack_fd_token(_FD_TOKEN_SIZE, fd, token)
        except struct.error:
            _args.fd(fd, "preserve")  # raises EBADF: no fd can have this number
            raise
        try:
            self._port.ioctl(self._fd, _PRESERVE_FD, arg)
        except (OSError, ValueError) as exc:
            self._retry(exc, _PRESERVE_FD, arg, "preserve", fd=fd, token=token)

    def retrieve(self, token: int) -> int:
        """Retrieve the file preserved under ``token`` by the previous kernel,
        as a new close-on-exec fd that the caller owns. Retrieving a token
        again gives another fd of the same file. Only on an incoming session.

        Raises OSError: ENOENT (no such token; after :meth:`finish` there is
        none left, since the kernel let go of every file), EINVAL (an
        outgoing session), or the error of a first failed retrieve of that
        token, which the kernel repeats for every later attempt."""
        if type(token) is not int or not 0 <= token <= 0xFFFFFFFFFFFFFFFF:
            token = _args.token(token, "retrieve")
        arg = _pack_fd_token(_FD_TOKEN_SIZE, -1, token)
        try:
            out = self._port.ioctl(self._fd, _RETRIEVE_FD, arg)
        except (OSError, ValueError) as exc:
            out = self._retry(exc, _RETRIEVE_FD, arg, "retrieve", token=token)
        fd: int = _unpack_fd_token(out)[1]
        return fd

    def finish(self) -> None:
        """Tell the kernel the session is restored: it lets go of every file
        preserved in it, retrieved or not, so a later :meth:`retrieve` gets
        ENOENT; the fds already retrieved stay the caller's. The session
        itself lives on until it is closed. Only on an incoming session.

        Raises OSError: EINVAL (an outgoing session), EBUSY (a file's handler
        cannot finish yet; the files stay preserved and finish may be tried
        again)."""
        self._call(_abi.SESSION_FINISH, _abi.FINISH.pack(_abi.FINISH.size, 0), "finish")
        self._state = "finished"

    @property
    def name(self) -> str:
        """The session's name, asked of the kernel (GET_NAME). Bytes that are
        not UTF-8 come back as surrogate escapes; see :attr:`name_bytes`."""
        return self.name_bytes.decode("utf-8", "surrogateescape")

    @property
    def name_bytes(self) -> bytes:
        """The session's name as the kernel stores it (GET_NAME)."""
        self._name = self._get_name()
        return self._name

    def _get_name(self) -> bytes:
        out = self._call(_abi.SESSION_GET_NAME, _abi.GET_NAME.pack(_abi.GET_NAME.size, 0, b""), "get_name")
        name: bytes = _abi.GET_NAME.unpack(out)[2]
        return name.split(b"\0", 1)[0]

    # -- plumbing ----------------------------------------------------------

    def _op_args(self) -> "Dict[str, Any]":
        return {"session": self._shown_name()}

    def _shown_name(self) -> str:
        if self._name is None:
            return f"<fd {self._fd}>"
        return self._name.decode("utf-8", "surrogateescape")

    @property
    def state(self) -> str:
        """What this handle knows of its session: "outgoing" (created in
        this kernel), "incoming" (handed over by the previous one), "finished"
        (finished through this handle), "closed", or "unknown" (adopted with
        :meth:`from_fd` from a kernel that answered neither way)."""
        return "closed" if self._fd < 0 else self._state

    def detach(self) -> int:
        """Give up the fd without closing it (for SCM_RIGHTS, systemd's fd store,
        exec); the caller owns it afterwards and this object is closed."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the session fd; a no-op when already closed. Closing the last
        fd of an outgoing session stops preserving its files; of an incoming
        session, finishes it."""
        Handle.close(self)

    def __repr__(self) -> str:
        # Uses the cached name: a repr must not call into the kernel.
        name = "?" if self._name is None else repr(self._shown_name())
        if self._fd < 0:
            return f"<liveupdate.Session {name} closed backend={self._port.kind}>"
        return f"<liveupdate.Session {name} fd={self._fd} {self._state} backend={self._port.kind}>"


class _Built(Session):
    """How this package makes a Session: ``Session()`` refuses callers, and
    its subclass with ``object.__init__`` is the cheapest way CPython builds
    an object (no ``__init__`` frame), which matters on the hot path of
    create_session for programs that keep thousands of sessions. It adds
    nothing, and presents itself as Session."""

    __slots__ = ()
    if not TYPE_CHECKING:  # to checkers, Session's own __init__ signature
        __init__ = object.__init__


_Built.__name__ = _Built.__qualname__ = "Session"
