"""A pure-Python emulator of Linux 7.3 Live Update, kexec included.

Where there is no ``/dev/liveupdate``, :class:`Emulator` plays the kernel:
the same API (:meth:`Emulator.open` returns a :class:`liveupdate.Device`),
the same answers and errnos, and an emulated kexec you trigger::

    >>> import liveupdate, os
    >>> emu = liveupdate.Emulator()
    >>> dev = emu.open()
    >>> s = dev.create_session("cache")
    >>> fd = os.memfd_create("data"); os.write(fd, b"hello")
    >>> s.preserve(fd, token=1)
    >>> emu.kexec()                      # serialize, boot a new kernel from memory alone
    >>> dev = emu.open()                 # the old handles now raise StaleHandleError
    >>> s = dev.retrieve_session("cache"); new = s.retrieve(1); s.finish()
    >>> os.pread(new, 5, 0)
    b'hello'

The modules mirror the kernel, one concept each: :mod:`.kho` (emulated
physical memory, preservation, the handover), :mod:`.kho_block` (the block
chains), :mod:`.luo_session`, :mod:`.luo_file`, :mod:`.memfd_luo` (the
"memfd-v2" handler), :mod:`.luo_core` (the device, ioctl rules, boot and
reboot), :mod:`.port` (real fds in front of it), :mod:`.image` (image
files) and :mod:`.walk` (decode preserved memory).

What crosses an emulated kexec is the :class:`~.kho.PhysicalMemory` and
nothing else: the new :class:`~.luo_core.Kernel` rebuilds its state from
the bytes the old one serialized there.

Looking inside (REPL)::

    >>> emu                                   # sessions, files, blocks, counts
    >>> for record in emu.walk():             # the last handover, decoded
    ...     print(record)
    Subtree(name='LUO', pa=4294967296, size=32)
    Root(pa=4294967296, compatible=b'luo-v5', liveupdate_num=1, sessions_pa=..., flbs_pa=...)
    Block(chain='sessions', index=0, pa=..., next=0, count=1, capacity=51)
    Session(pa=..., name=b'cache', files_pa=..., files_count=1)
    Block(chain="files of 'cache'", index=0, pa=..., next=0, count=1, capacity=63)
    File(pa=..., session=b'cache', compatible=b'memfd-v2', token=1, data=...)
    Memfd(pa=..., token=1, pos=5, size=5, seals=1, flags=0, nr_folios=1, folios=((..., 3, 0),))
    >>> emu.memory.read(pa, 16)               # raw bytes at a physical address
    >>> from liveupdate.emulator import image, walk
    >>> list(walk(image.load("saved.img")))   # an image file, without booting it

Limits of an emulator in a process (each documented where it arises): fds
of its own (kept out of the program's fd budget, see :mod:`._host`), a
file held as a mapping once fds run short (:mod:`.kfile`), a size change of
a preserved memfd it cannot refuse (:mod:`.memfd_luo`).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterator, Optional, Union

from ..device import Device
from ..errors import KernelPanic
from . import image as _image
from .kho import Handover, PhysicalMemory
from .luo_core import Kernel
from .port import EmulatorPort
from .walk import walk

__all__ = ["Emulator", "default", "walk", "PhysicalMemory", "Handover", "Kernel", "KernelPanic"]

PathLike = Union[str, "os.PathLike[str]"]


class Emulator:
    """An emulated Live Update kernel in this process.

    ``Emulator()`` boots a fresh machine (first boot, nothing handed over).
    ``Emulator.from_image(path)`` boots from a saved image; ``Emulator.boot(
    memory)`` from a :class:`PhysicalMemory` (both raise
    :class:`liveupdate.KernelPanic` when the handed-over state cannot boot).

    Attributes: ``port`` (the object the public API and the service talk
    to), ``memory`` (the emulated RAM), ``kernel`` (the running kernel, None
    after a panic), ``kexecs`` (kexecs done by this object)."""

    def __init__(self, *, memory: Optional[PhysicalMemory] = None) -> None:
        self.memory = memory if memory is not None else PhysicalMemory()
        self.kernel: Optional[Kernel] = None
        self.kexecs = 0
        self.port = EmulatorPort(self)
        self.kernel = Kernel.boot(self.memory)

    @classmethod
    def boot(cls, memory: PhysicalMemory) -> "Emulator":
        """Boot a new emulator from the handover recorded in ``memory``
        (e.g. another emulator's, possibly edited), as it was handed over:
        what the other kernel consumed since is back. Raises KernelPanic."""
        return cls(memory=PhysicalMemory.from_handover(memory.handover, memory.next_pfn))

    @classmethod
    def from_image(cls, path: PathLike) -> "Emulator":
        """Boot from an image file. Raises OSError ENOEXEC (not a valid
        image) or the read's errno; KernelPanic (the state cannot boot)."""
        return cls(memory=_image.load(path))

    # -- user space -------------------------------------------------------------------
    def open(self, path: str = "/dev/liveupdate", *, timeout: float = 0) -> Device:
        """Open the emulated device: a :class:`liveupdate.Device`.

        Raises OSError: EBUSY (held, after ``timeout`` seconds), EIO (the
        previous kernel's sessions could not be restored), ENODEV (the
        kernel panicked)."""
        return Device._open_port(self.port, path, timeout)

    # -- the machine -------------------------------------------------------------------
    def kexec(self, *, image: Optional[PathLike] = None, image_checkpoint: Any = None,
              image_progress: Any = None) -> None:
        """Reboot into a new emulated kernel through the live update path.

        Serializes every outgoing session into preserved memory, optionally
        writes what will be handed over to ``image`` (atomically; durable
        before anything is committed), hands the memory over (only
        preserved pages survive) and boots a new kernel from the memory
        alone. Every handle of the old kernel then fails with ESTALE.

        Raises OSError if serialization fails or the image cannot be
        written (ENOSPC, EROFS ...): the old kernel keeps running and its
        handles stay valid, as reboot() fails, and the file at ``image``
        keeps the previous handover. KernelPanic if the new kernel cannot
        boot from what was handed over (``kernel`` is then None).
        ``image_checkpoint`` and ``image_progress`` are passed to
        :func:`.image.save` (the service's fault points and progress)."""
        with self.port.lock:
            kernel = self._running()
            self.port.reap()  # fds closed without the port knowing: released before reboot
            writer = None
            if image is not None:
                path = image

                def writer(handover: Handover) -> None:
                    _image.save(path, handover, image_checkpoint, image_progress)

            kernel.reboot(writer)
            self.port.retire(kernel)
            self.kexecs += 1
            self.kernel = None
            self.kernel = Kernel.boot(self.memory)

    def save_image(self, path: PathLike) -> None:
        """Write the memory handed over by the last kexec (or booted from)
        to ``path``, atomically. memfd pages are read from their memfds now,
        so call it right after :meth:`kexec` (or pass ``image`` to it)
        if the retrieved memfds will change. Before any kexec the image is
        an empty handover (a first boot)."""
        with self.port.lock:
            _image.save(path, self.memory.handover)

    @property
    def liveupdate_num(self) -> int:
        """The running kernel's liveupdate number: how many live update
        kexecs led to it (0 on a first boot)."""
        return self._running().liveupdate_num

    def walk(self) -> Iterator[Any]:
        """Decode the last handover (see :func:`liveupdate.emulator.walk`)."""
        return walk(self)

    def _running(self) -> Kernel:
        if self.kernel is None:
            raise OSError(19, "the emulated kernel panicked at boot; create a new Emulator")  # ENODEV
        return self.kernel

    def __repr__(self) -> str:
        if self.kernel is None:
            return f"<liveupdate.Emulator: kernel panicked after {self.kexecs} kexecs>"
        k = self.kernel
        s = k.sessions
        lines = [(f"<liveupdate.Emulator kernel #{k.liveupdate_num}, {self.kexecs} kexecs here, "
                  f"device {'open' if k.in_use else 'free'}, {len(self.port.handles)} handles")]
        for header in (s.outgoing, s.incoming):
            if header.count or header.block_set.nblocks:
                lines.append(f"  {header!r}")
            for session in list(header.sessions.values())[:20]:
                lines.append(f"    {session!r}")
            if header.count > 20:
                lines.append(f"    ... {header.count - 20} more")
        lines.append(f"  {self.memory!r}>")
        return "\n".join(lines)


_default: Optional[Emulator] = None
_default_lock = threading.Lock()


def default() -> Emulator:
    """The process-wide emulator ``liveupdate.open(backend="auto")`` uses on
    a machine without the device (created on first use)."""
    global _default
    with _default_lock:
        if _default is None or _default.kernel is None:
            _default = Emulator()
        return _default
