"""The file-handler seam (issue 14): a second handler, defined only in
tests/emulator/blob_handler.py, goes through preserve, kexec (in process
and through an image), retrieve, finish and `liveupdate inspect`."""
from __future__ import annotations

import errno
import json
import os

import pytest

from liveupdate.cli import main
from liveupdate.emulator import Emulator, file_handler
from liveupdate.emulator.walk import File

from . import blob_handler


@pytest.fixture
def blob():
    blob_handler.install()
    yield blob_handler.BlobHandler
    blob_handler.remove()


def _named_file(tmp_path, data: bytes) -> int:  # type: ignore[no-untyped-def]
    path = tmp_path / "named.txt"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_a_second_handler_goes_through_every_layer(blob, tmp_path, capsys):  # type: ignore[no-untyped-def]
    emu = Emulator()
    dev = emu.open()
    s = dev.create_session("mixed")
    named = _named_file(tmp_path, b"kept by the test handler")
    memfd = os.memfd_create("m")
    os.write(memfd, b"memfd data")
    s.preserve(named, 1)  # the memfd handler refuses it, the blob one takes it
    s.preserve(memfd, 2)
    again = os.dup(named)
    with pytest.raises(OSError) as info:
        s.preserve(again, 3)  # the same file twice: EBUSY, via the handler's get_id
    assert info.value.errno == errno.EBUSY
    os.close(again)
    dev.close()
    path = tmp_path / "mixed.img"
    emu.kexec(image=str(path))
    s.close()
    [f1, f2] = [r for r in emu.walk() if isinstance(r, File)]
    assert (f1.compatible, f2.compatible) == (b"testblob-v1", b"memfd-v2")
    # inspect shows what the handler says its record holds.
    assert main(["inspect", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    files = doc["sessions"][0]["files"]
    assert files[0]["blob"]["length"] == 24 and files[0]["memfd"] is None
    assert files[1]["memfd"]["size"] == 10
    assert main(["inspect", str(path)]) == 0
    assert "testblob-v1, blob of 24 bytes starting b'kept by '" in capsys.readouterr().out
    # Retrieve and finish, in process and from the image.
    for kernel in (emu, Emulator.from_image(str(path))):
        with kernel.open() as dev2:
            incoming = dev2.retrieve_session("mixed")
            fd = incoming.retrieve(1)
            assert os.read(fd, 100) == b"kept by the test handler"
            fd2 = incoming.retrieve(2)
            assert os.pread(fd2, 10, 0) == b"memfd data"
            incoming.finish()
            incoming.close()
            os.close(fd)
            os.close(fd2)
    os.close(named)
    os.close(memfd)


def test_without_the_handler_the_file_is_refused_as_the_kernel_would(tmp_path):  # type: ignore[no-untyped-def]
    named = _named_file(tmp_path, b"x")
    with Emulator().open() as dev, dev.create_session("s") as s:
        with pytest.raises(OSError) as info:
            s.preserve(named, 1)
        assert info.value.errno == errno.ENOENT
    os.close(named)


def test_registration_checks_the_contract(blob):  # type: ignore[no-untyped-def]
    class Incomplete(file_handler.FileHandler):
        compatible = b"incomplete-v1"

        def can_preserve(self, file):  # type: ignore[no-untyped-def]
            return False

    with pytest.raises(OSError) as info:
        file_handler.register(Incomplete)
    assert info.value.errno == errno.EINVAL

    class Clash(blob):  # type: ignore[misc,valid-type]
        pass

    with pytest.raises(OSError) as info:
        file_handler.register(Clash)
    assert info.value.errno == errno.EEXIST

    class TooLong(blob):  # type: ignore[misc,valid-type]
        compatible = b"x" * 48

    with pytest.raises(OSError) as info:
        file_handler.register(TooLong)
    assert info.value.errno == errno.EINVAL
