"""Progress lines for large images: `liveupdate inspect` while it reads,
`liveupdate emulator kexec` while the service writes its image (the
service itself logs its writes, see liveupdate.service.kernel)."""
from __future__ import annotations

import os
import time

import liveupdate
from liveupdate.cli import main
from liveupdate.service import kexec_progress


def test_inspect_of_a_large_image_shows_progress(tmp_path, capsys):
    emu = liveupdate.Emulator()
    fd = os.memfd_create("dense")
    os.write(fd, b"\xa5" * (72 << 20))  # 72 MiB of data: an image above one 64 MiB step
    with emu.open() as dev:
        s = dev.create_session("big")
        s.preserve(fd, 1)
    path = tmp_path / "big.img"
    emu.kexec(image=str(path))
    s.close()
    os.close(fd)
    assert main(["inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert f"liveupdate inspect: reading {path}: 64 of 72 MiB" in captured.err
    assert "memfd of 75497472 bytes" in captured.out


def test_small_images_print_no_progress(tmp_path, capsys):
    emu = liveupdate.Emulator()
    path = tmp_path / "small.img"
    emu.kexec(image=str(path))
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().err == ""


def test_kexec_reports_the_image_growing_while_it_waits(tmp_path):
    image = str(tmp_path / "svc.img")
    lines = []

    def slow_kexec():
        tmp = tmp_path / ".svc.img.tmp.1.abcdef0123456789"
        tmp.write_bytes(b"x" * (3 << 20))
        time.sleep(0.5)
        os.rename(tmp, image)
        return {"boot": 1}

    assert kexec_progress.with_progress(slow_kexec, image, lines.append, every=0.1) == {"boot": 1}
    assert lines and all("writing its image" in line for line in lines[1:])
    assert any("3 MiB so far" in line for line in lines)


def test_kexec_errors_come_through_and_no_image_says_waiting(tmp_path):
    lines = []

    def failing():
        time.sleep(0.25)
        raise OSError(28, "no space")

    try:
        kexec_progress.with_progress(failing, None, lines.append, every=0.1)
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("the error was swallowed")
    assert lines and all("waiting for the service" in line for line in lines)


def test_the_service_logs_its_large_image_writes(caplog):
    from liveupdate.service.kernel import PROGRESS_PAGES, progress_logger

    report = progress_logger("writing image /x.img", every=0.0)
    with caplog.at_level("WARNING", logger="liveupdate.emulator.service"):
        report(10, 100)  # a small image: nothing
        report(PROGRESS_PAGES // 2, PROGRESS_PAGES)
        report(PROGRESS_PAGES, PROGRESS_PAGES)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["writing image /x.img: 128 of 256 MiB (50%)", "writing image /x.img: 256 of 256 MiB (100%)"]
