"""A kexec whose image cannot be written is not committed (issue 12 item 7).

As in the kernel, where a failed serialization fails the reboot with the
old kernel running: the image is written first, the kexec committed only
once it is durable. Before, the new kernel was live (old handles stale)
while the file still held the previous handover."""
from __future__ import annotations

import errno
import os

import pytest

from liveupdate.emulator import Emulator, image, walk
from liveupdate.emulator.walk import Session
from liveupdate.service.kernel import Kernel


def _no_space(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_image_write_leaves_the_old_kernel_running(tmp_path, monkeypatch):
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("kept")
    fd = os.memfd_create("data")
    os.write(fd, b"before")
    s.preserve(fd, 1)
    path = tmp_path / "handover.img"
    emu.kexec(image=str(path))  # generation 1 on disk
    s.close()
    previous = path.read_bytes()
    dev = emu.open()
    s = dev.retrieve_session("kept")
    got = s.retrieve(1)
    s.finish()
    s.close()
    out = dev.create_session("next")
    out.preserve(got, 2)
    monkeypatch.setattr("liveupdate._atomic.os.fsync", _no_space)
    with pytest.raises(OSError) as info:
        emu.kexec(image=str(path))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # Nothing was committed: same kernel, the handles work, the file holds
    # the previous handover and no temporary is left.
    assert emu.liveupdate_num == 1 and emu.kexecs == 1
    assert out.name == "next"
    fd2 = os.memfd_create("more")
    out.preserve(fd2, 3)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["handover.img"]
    # And the next kexec hands over everything, the unfrozen session too.
    dev.close()
    emu.kexec(image=str(path))
    out.close()
    booted = Emulator.from_image(str(path))
    with booted.open() as dev2:
        s2 = dev2.retrieve_session("next")
        new = s2.retrieve(2)
        assert os.pread(new, 6, 0) == b"before"
        s2.retrieve(3)
        s2.close()
    for f in (fd, fd2, got, new):
        os.close(f)


def test_the_service_commits_its_kexec_only_with_its_image(tmp_path, monkeypatch):
    path = tmp_path / "svc.img"
    kernel = Kernel(str(path))
    dev = kernel.emu.open()
    s = dev.create_session("svc")
    dev.close()
    kernel.kexec()
    s.close()
    previous = path.read_bytes()
    dev = kernel.emu.open()
    s = dev.create_session("second")
    dev.close()
    monkeypatch.setattr("liveupdate._atomic.os.fsync", _no_space)
    with pytest.raises(OSError) as info:
        kernel.kexec()
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and "did not happen" in str(info.value)
    assert kernel.boots == 1 and kernel.emu.liveupdate_num == 1
    assert s.name == "second"  # not stale
    assert path.read_bytes() == previous
    assert [r.name for r in walk(image.load(str(path))) if isinstance(r, Session)] == [b"svc"]
    kernel.kexec()
    s.close()
    assert kernel.boots == 2
