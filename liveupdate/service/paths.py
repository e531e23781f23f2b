"""Where the service's socket lives, and making it safely."""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import Optional, Tuple

__all__ = ["SOCKET_NAME", "default_socket_path", "resolve_socket_path", "bind_listener", "MAX_SOCKET_PATH"]

SOCKET_NAME = "liveupdate-emulator.sock"
#: sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


def default_socket_path() -> Optional[str]:
    """``$XDG_RUNTIME_DIR/liveupdate-emulator.sock``, or None without
    XDG_RUNTIME_DIR (a shared /tmp is no place for a 0600 socket whose name
    anyone could squat)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        return None
    return os.path.join(runtime, SOCKET_NAME)


def resolve_socket_path(path: Optional[str]) -> str:
    """``path``, else ``$LIVEUPDATE_EMULATOR``, else the default.

    Raises OSError(EINVAL) with what to do when none is known, or when the
    path is too long for a unix socket."""
    chosen = path or os.environ.get("LIVEUPDATE_EMULATOR") or default_socket_path()
    if not chosen:
        raise OSError(errno.EINVAL, "no socket path: XDG_RUNTIME_DIR is not set, so name one with --socket PATH "
                                    "(or set LIVEUPDATE_EMULATOR=PATH)")
    chosen = os.path.abspath(chosen)
    if len(os.fsencode(chosen)) > MAX_SOCKET_PATH:
        raise OSError(errno.ENAMETOOLONG, f"socket path {chosen!r} is longer than the {MAX_SOCKET_PATH} bytes "
                                          f"a unix socket address holds; choose a shorter one")
    return chosen


def _occupant(path: str) -> Optional[Tuple[int, int]]:
    """(pid, uid) of whoever listens at ``path``, or None when nobody does."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
        pid, uid, _ = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    finally:
        probe.close()
    return pid, uid


def bind_listener(path: str, backlog: int = 128) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at ``path``, mode 0600 from birth.

    A stale socket file (nobody listening) is replaced. Raises OSError:
    EADDRINUSE (a service is listening there already), EEXIST (``path`` is
    something other than a socket), and whatever bind() says."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket (owner uid {st.st_uid}); "
                                        f"refusing to replace it")
        occupant = _occupant(path)
        if occupant is not None:
            pid, uid = occupant
            who = "this user" if uid == os.geteuid() else ("root" if uid == 0 else "another user")
            raise OSError(errno.EADDRINUSE, f"a process of uid {uid} ({who}, pid {pid}) is already listening "
                                            f"at {path}")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # umask, not a chmod after bind: there is no moment at which another
    # user could connect to a socket with looser permissions.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock
