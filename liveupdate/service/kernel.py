"""The emulated kernel a service runs: its boots and its image on disk."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ..errors import KernelPanic
from . import image as image_file

__all__ = ["Kernel"]


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
        """The reboot path: the emulator serializes the outgoing sessions and
        boots a new kernel from that memory; then the image (if any) is
        replaced by that memory, before any client can touch the new kernel.

        Raises KernelPanic (the new kernel cannot boot), OSError (the
        serialization failed and the old kernel runs on; or the kexec
        happened but the image could not be written: ENOSPC, EACCES ...,
        the previous image stays)."""
        self.emu.kexec()
        self.boots += 1
        if self.image:
            try:
                image_file.write_atomically(self.image, self._handover_bytes())
            except OSError as exc:
                raise OSError(exc.errno, f"the emulated kexec happened but the image {self.image} "
                                         f"could not be written: {exc.strerror or exc}") from None
        return {"boot": self.boots, "image": self.image, "liveupdate_number": self._number()}

    def _handover_bytes(self) -> bytes:
        # What Emulator.save_image() writes, as bytes, so that the write
        # itself is ours: one temporary file, with its fault points.
        from ..emulator import image as emulator_image

        with self.emu.port.lock:
            return emulator_image.dumps(self.emu.memory.handover)

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
