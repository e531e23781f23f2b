"""The emulator's IOCTL_OP tables: the command table's rows bound to handlers.

The kernel keeps a table per kind of file (``luo_ioctl_ops`` in luo_core.c
for the device, ``luo_session_ioctl_ops`` in luo_session.c for sessions),
indexed by the command number minus the file's base, each entry the
struct's size, its minimum size, the exact request number, (for sessions)
the kinds of session it applies to, and the function that runs it.

Here the rows are :data:`liveupdate._abi.COMMAND_TABLE`, the one statement
of the contract the binding and the service read too, and each module binds
its handlers to them by the command's name (``@DEVICE_OPS.handles(NAME)``
in luo_core.py, ``@SESSION_OPS.handles(NAME)`` in luo_session.py). A new
ioctl is a row in ``_abi`` plus one such function; the table is rebuilt
when the rows change (:func:`liveupdate._abi.register`), and a row with no
handler fails the first ioctl on its file, loudly, rather than answering
as if the kernel lacked it.

The checks every command shares run here, in the kernel's order: a number
beyond the table EINVAL, a missing size field EFAULT, a number in range
that is not exactly the row's (another type, direction or size, or a hole
in the table) ENOTTY (the kernel's ENOIOCTLCMD as the VFS reports it);
then, for a session, the wrong kind of session EINVAL (the caller checks
it, as only sessions have kinds); a size below the minimum EINVAL;
non-zero bytes beyond the struct E2BIG.
"""
from __future__ import annotations

import errno
from typing import Any, Callable, Dict, Generic, List, Optional, Protocol, Tuple, TypeVar

from .. import _abi
from .ucmd import Ucmd, copy_struct_from_user, get_user_size

__all__ = ["FdTable", "OpTable", "DEVICE_OPS", "SESSION_OPS"]

H = TypeVar("H", bound=Callable[..., None])


class FdTable(Protocol):
    """The caller's fd table, as the port lends it to one ioctl: reserve a
    number first (get_unused_fd_flags(): EMFILE before anything else
    happens), then install the result in it (fd_install()) or give it back
    (put_unused_fd()) when the operation failed. ``session`` and ``file``
    are the emulator's objects; the port only stores and installs them."""

    def reserve_session_fd(self) -> int: ...

    def install_session(self, fd: int, session: Any) -> None: ...

    def reserve_file_fd(self) -> int: ...

    def install_file(self, fd: int, file: Any) -> None: ...

    def put_unused_fd(self, fd: int) -> None: ...


class OpTable(Generic[H]):
    """One kind of file's table: its target ("device" or "session") and the
    handlers bound to the rows of that target by command name."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.base = _abi.CMD_BASE[target]
        self.handlers: Dict[str, H] = {}
        self._rows: Tuple[_abi.Command, ...] = ()
        self._ops: List[Optional[Tuple[_abi.Command, H]]] = []

    def handles(self, name: str) -> Callable[[H], H]:
        """Bind the decorated function to the row named ``name``."""
        def bind(fn: H) -> H:
            self.handlers[name] = fn
            return fn
        return bind

    def ops(self) -> List[Optional[Tuple[_abi.Command, H]]]:
        """The table, indexed by command number minus the base; None where
        the numbering has a hole. Rebuilt when the command table changed."""
        rows = _abi.COMMAND_TABLE
        if rows is not self._rows:
            mine = [row for row in rows if row.target == self.target]
            missing = [row.name for row in mine if row.name not in self.handlers]
            if missing:
                raise RuntimeError(f"the emulator has no handler for {', '.join(missing)}")
            ops: List[Optional[Tuple[_abi.Command, H]]] = [None] * (max((r.index for r in mine), default=-1) + 1)
            for row in mine:
                ops[row.index] = (row, self.handlers[row.name])
            self._ops, self._rows = ops, rows
        return self._ops

    def find(self, cmd: int, arg: bytes) -> Tuple[_abi.Command, H, int]:
        """The row and handler of request ``cmd``, and the caller's size
        field. Raises OSError EINVAL, EFAULT, ENOTTY (see the module)."""
        ops = self.ops()
        index = _abi.IOC_NR(cmd) - self.base
        if not 0 <= index < len(ops):
            raise OSError(errno.EINVAL, f"{self.target} command number {_abi.IOC_NR(cmd):#x} does not exist")
        user_size = get_user_size(arg)
        op = ops[index]
        if op is None or op[0].number != cmd:
            expected = f" is not {op[0].number:#x} ({op[0].name})" if op is not None else " is no command"
            raise OSError(errno.ENOTTY, f"ioctl {cmd:#x}{expected}")
        return op[0], op[1], user_size

    @staticmethod
    def ucmd(row: _abi.Command, arg: bytes, user_size: int) -> Ucmd:
        """The kernel's copy of the argument. Raises OSError EINVAL (below
        the minimum size), E2BIG, EFAULT."""
        if user_size < row.min_size:
            raise OSError(errno.EINVAL, f"argument size {user_size} is below {row.min_size}")
        return Ucmd(arg, user_size, copy_struct_from_user(row.size, arg, user_size))


#: Handlers of device commands: fn(kernel, ucmd, fds), filling ucmd.cmd.
DEVICE_OPS: "OpTable[Callable[..., None]]" = OpTable("device")
#: Handlers of session commands: fn(kernel, session, ucmd, fds).
SESSION_OPS: "OpTable[Callable[..., None]]" = OpTable("session")
