"""The emulated kernel a service runs: its boots and its image on disk."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Optional

from ..errors import KernelPanic
from . import image as image_file

__all__ = ["Kernel"]

log = logging.getLogger("liveupdate.emulator.service")

#: Images at least this large get progress lines in the service's log.
PROGRESS_PAGES = 1 << 16  # 256 MiB


def progress_logger(what: str, unit: str = "pages", every: float = 2.0) -> Callable[[int, int], None]:
    """progress(done, total) that logs a line at most every ``every``
    seconds, for writes and reads of large images."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if (now - last[0] < every and done < total) or total < PROGRESS_PAGES:
            return
        last[0] = now
        scale = 4096 if unit == "pages" else 1
        log.warning("%s: %d of %d MiB (%d%%)", what, done * scale >> 20, total * scale >> 20,
                    100 * done // max(1, total))

    return report


def _emulator_class() -> Any:
    from ..emulator import Emulator

    return Emulator


class Kernel:
    """An :class:`liveupdate.emulator.Emulator` plus what the service adds:
    a boot counter (which tells current handles from stale ones) and, with
    ``image``, the preserved memory kept on disk across service restarts.

    ``image``: boot from it when it exists (KernelPanic if it is corrupt, as
    the kernel panics on a broken handover), and replace it atomically at
    each kexec. ``emulator_class`` is for tests of the relay itself."""

    def __init__(self, image: Optional[str] = None, emulator_class: Any = None) -> None:
        self.image = os.path.abspath(image) if image else None
        self._cls = emulator_class or _emulator_class()
        self.boots = 0
        self.booted_from_image = False
        if self.image:
            image_file.remove_stale_temporaries(self.image)
        if self.image and os.path.exists(self.image):
            try:
                self.emu = self._cls.from_image(self.image)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot boot from image {self.image}: {exc.strerror or exc}") from None
            except KernelPanic as exc:
                raise KernelPanic(f"cannot boot from image {self.image}: {exc}") from None
            self.booted_from_image = True
        else:
            self.emu = self._cls()

    @property
    def port(self) -> Any:
        return self.emu.port

    def kexec(self) -> Dict[str, Any]:
        """The reboot path: the emulator serializes the outgoing sessions,
        the image (if any) is replaced by what will be handed over, and only
        once it is durable is the kexec committed and a new kernel booted
        from that memory, before any client can touch it.

        Raises KernelPanic (the new kernel cannot boot), OSError (the
        serialization failed, or the image could not be written: ENOSPC,
        EROFS, EACCES ...; either way the old kernel runs on, its handles
        stay valid, and the previous image stays)."""
        if self.image:
            try:
                self.emu.kexec(image=self.image, image_checkpoint=image_file._checkpoint,
                               image_progress=progress_logger(f"writing image {self.image}"))
            except OSError as exc:
                raise OSError(exc.errno, f"the emulated kexec did not happen (the old kernel runs on): "
                                         f"{exc.strerror or exc}") from None
        else:
            self.emu.kexec()
        self.boots += 1
        return {"boot": self.boots, "image": self.image, "liveupdate_number": self._number()}

    def release(self, handle: int, boot: int) -> None:
        """The last client copy of ``handle`` is gone: the emulator's release()
        (for a handle of a replaced kernel, just the close).

        Raises OSError from the emulator."""
        self.emu.port.close(handle)

    def _number(self) -> Optional[int]:
        try:
            return int(self.emu.liveupdate_num)
        except (AttributeError, OSError):
            return None

    def describe(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {
            "boot": self.boots,
            "booted_from_image": self.booted_from_image,
            "image": self.image,
            "liveupdate_number": self._number(),
        }
        sessions = getattr(getattr(self.emu, "kernel", None), "sessions", None)
        if sessions is not None:
            info["outgoing_sessions"] = sessions.outgoing.count
            info["incoming_sessions"] = sessions.incoming.count
        return info
