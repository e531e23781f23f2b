"""When the service's event loop may call the emulated kernel.

The loop calls the kernel itself for short calls when the kernel is free
(it can take the kernel's lock at once: no wait, no thread switch, the
common case). A long call (see :data:`.requests.LONG_CALL_BYTES`, and every
kexec) goes to the :class:`.worker.KernelWorker` instead, and the loop goes
on serving. Kernel work that finds the kernel busy waits here, in arrival
order, with its connection paused (read no further, so that its requests
keep their order), and runs once the worker reports.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable, Deque, Optional

from .connection import Connection
from .worker import KernelWorker

__all__ = ["KernelQueue", "Done"]

#: What runs on the loop once a kernel call is over: done(result, exception).
Done = Callable[[Any, Optional[BaseException]], None]


class KernelQueue:
    """Kernel calls of one service, in order (see the module doc).

    ``lock``: the emulated kernel's lock (None for a kernel without one);
    ``pause``/``resume``: stop and restart reading a connection;
    ``wake_fd``: the loop's wake pipe, written when the worker is done."""

    def __init__(self, lock: Any, wake_fd: int, pause: Callable[[Connection], None],
                 resume: Callable[[Connection], None]) -> None:
        self._lock = lock
        self._pause = pause
        self._resume = resume
        self._worker = KernelWorker(wake_fd)
        self._parked: Deque[Callable[[], None]] = collections.deque()
        self._exclusive = False  # a kexec runs: nothing else may touch the kernel

    @property
    def busy(self) -> bool:
        """A call runs on the worker."""
        return self._worker.busy

    @property
    def waiting(self) -> int:
        return len(self._parked)

    def run(self, call: Callable[[], Any], done: Done, long: bool = False, exclusive: bool = False,
            conn: Optional[Connection] = None, prepare: Optional[Callable[[], None]] = None) -> None:
        """Run ``call()`` on the kernel, then ``done(result, exception)`` on
        the loop: at once when the kernel is free (on the worker when
        ``long``), else once it is, after what waits already. ``exclusive``
        (a kexec, a long release: calls whose outcome changes the answers of
        later ones): on the worker, with nothing else run meanwhile; other
        long calls may be overtaken by short ones, as concurrent ioctls on
        different sessions are unordered in the kernel. ``conn`` is read no further
        until then. ``prepare()`` runs on the loop when the call's turn has
        come, before it starts (it charges budgets; what it raises is the
        call's outcome)."""
        if (self._parked or self._exclusive or (exclusive and self._worker.busy)
                or (self._lock is not None and not self._lock.acquire(blocking=False))):
            if conn is not None:
                self._pause(conn)
            self._parked.append(lambda: self.run(call, done, long, exclusive, conn, prepare))
            return
        try:
            if conn is not None:
                self._resume(conn)
            if prepare is not None:
                try:
                    prepare()
                except Exception as exc:
                    done(None, exc)
                    return
            if long or exclusive:
                if conn is not None:
                    self._pause(conn)
                self._exclusive = exclusive
                self._worker.submit(call, lambda result, exc: self._after_worker(conn, done, result, exc))
                return
            try:
                result = call()
            except Exception as exc:
                done(None, exc)
            else:
                done(result, None)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _after_worker(self, conn: Optional[Connection], done: Done, result: Any, exc: Optional[BaseException]) -> None:
        self._exclusive = False
        if conn is not None:
            self._resume(conn)
        done(result, exc)

    def woken(self, wake_r: int) -> None:
        """The loop's wake pipe was readable: answer what the worker finished,
        then what waited for it."""
        try:
            while os.read(wake_r, 512):
                pass
        except OSError:
            pass
        for done, result, exc in self._worker.completed():
            done(result, exc)
        self.run_parked()

    def run_parked(self) -> None:
        waiting, self._parked = self._parked, collections.deque()
        while waiting:
            if self._parked:  # one found the kernel busy again: the rest wait behind it
                self._parked.extend(waiting)
                return
            waiting.popleft()()

    def stop(self) -> None:
        """Let the call in progress end (bounded wait) and stop the worker."""
        self._worker.stop()
