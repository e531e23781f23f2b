"""Long kernel calls off the event loop: one worker thread.

A preserve of a large memfd, the release or finish of a session holding
one, a kexec (which serializes everything and may write an image) take the
emulated kernel a long time. Run on the event loop, they would stop it for
every client: no accept, no reply, no refusal, no status. The loop hands
such a call to this worker and goes on; the worker runs it, queues the
outcome and wakes the loop (a byte on its wake pipe), which then answers.

One call at a time, in order: the emulated kernel serialises its calls on
one lock anyway, and while a call runs here the loop keeps every later
kernel request in arrival order (see :class:`.server.Server`), so no
request can overtake another as it could not in the kernel's own order of
locks. The worker only runs the call; it never touches the service's
connections, selector or ledger.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["KernelWorker", "Outcome"]

#: (the completion to run on the loop, the call's result, its exception)
Outcome = Tuple[Callable[[Any, Optional[BaseException]], None], Any, Optional[BaseException]]


class KernelWorker:
    """A thread that runs one kernel call at a time and reports to the loop
    through ``wake_fd`` (the write end of the loop's wake pipe)."""

    def __init__(self, wake_fd: int) -> None:
        self._wake_fd = wake_fd
        self._calls: "queue.Queue[Optional[Tuple[Callable[[], Any], Callable[[Any, Optional[BaseException]], None]]]]"
        self._calls = queue.Queue()
        self._done: List[Outcome] = []
        self._done_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.busy = False

    def submit(self, call: Callable[[], Any], done: Callable[[Any, Optional[BaseException]], None]) -> None:
        """Run ``call()`` on the worker; ``done(result, exception)`` runs on
        the loop once it is over (from :meth:`completed`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="liveupdate-service-kernel", daemon=True)
            self._thread.start()
        self.busy = True
        self._calls.put((call, done))

    def _run(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            call, done = item
            result: Any = None
            error: Optional[BaseException] = None
            try:
                result = call()
            except BaseException as exc:  # handed to the loop, which answers it
                error = exc
            _give_back_to_the_system()
            with self._done_lock:
                self._done.append((done, result, error))
            try:
                os.write(self._wake_fd, b"k")
            except OSError:
                pass  # the pipe is full: the loop wakes up anyway

    def completed(self) -> List[Outcome]:
        """The outcomes reported since the last call, in order (on the loop)."""
        with self._done_lock:
            done, self._done = self._done, []
        if done:
            self.busy = False
        return done

    def stop(self, timeout: float = 60.0) -> None:
        """Let the call in progress end and stop the thread (bounded wait)."""
        if self._thread is not None:
            self._calls.put(None)
            self._thread.join(timeout)
            self._thread = None


def _trimmer() -> Optional[Callable[[int], int]]:
    try:
        import ctypes

        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
        return trim
    except (OSError, AttributeError, ImportError):  # not glibc
        return None


_trim: Optional[Callable[[int], int]] = None
_trim_known = False


def _give_back_to_the_system() -> None:
    # A long call is one that made the emulator allocate or free a lot; what
    # it freed stays in the C heap unless handed back, and the service's RSS
    # would keep the high-water mark of every client's largest preserve.
    global _trim, _trim_known
    if not _trim_known:
        _trim, _trim_known = _trimmer(), True
    if _trim is not None:
        _trim(0)
