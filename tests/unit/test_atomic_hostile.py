"""liveupdate._atomic in a hostile directory (issue 12 item 1): planted
links at the temporary name or at the final path, non-regular targets, and
the streaming writer."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from liveupdate import _atomic


def test_a_link_planted_at_the_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    target = tmp_path / "image.img"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    # Another user guesses the next temporary name and plants a link there.
    # Before: the name was .image.img.tmp.PID, opened O_CREAT|O_TRUNC: the
    # victim was truncated and overwritten.
    planted = tmp_path / f".image.img.tmp.{os.getpid()}"
    os.symlink(victim, planted)
    tokens = iter(["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"])
    fake = type("FakeSecrets", (), {"token_hex": staticmethod(lambda n: next(tokens))})
    monkeypatch.setattr(_atomic, "secrets", fake, raising=False)
    guessed = tmp_path / f".image.img.tmp.{os.getpid()}.aaaaaaaaaaaaaaaa"
    os.symlink(victim, guessed)  # even the random name, guessed
    _atomic.write_atomically(str(target), b"new image")
    assert victim.read_bytes() == b"precious"
    assert os.path.islink(planted) and os.path.islink(guessed)
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o777 == 0o600
    assert target.read_bytes() == b"new image"


def test_temporary_names_are_not_predictable():
    names = {_atomic.temporary_path("/x/y") for _ in range(50)}
    assert len(names) == 50
    assert all(name.startswith(f"/x/.y.tmp.{os.getpid()}.") for name in names)


def test_a_final_path_that_is_a_symlink_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "image.img"
    os.symlink(victim, link)
    with pytest.raises(OSError) as info:
        _atomic.write_atomically(str(link), b"new")
    assert info.value.errno == errno.ELOOP and "symbolic link" in str(info.value)
    assert victim.read_bytes() == b"precious" and os.path.islink(link)
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_final_path_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = tmp_path / "image.img"
    if kind == "directory":
        path.mkdir()
        expected = errno.EISDIR
    else:
        os.mkfifo(path)
        expected = errno.EINVAL
    with pytest.raises(OSError) as info:
        _atomic.write_atomically(str(path), b"new")
    assert info.value.errno == expected and str(path) in str(info.value)
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_the_streaming_writer_commits_only_a_complete_file(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_writer(str(target)) as out:
            out.write(b"half")
            raise RuntimeError("the writer fails midway")
    assert target.read_bytes() == b"old"
    with _atomic.atomic_writer(str(target)) as out:
        for piece in (b"a" * 10, b"b" * 10, b"c"):
            out.write(piece)
        os.pwrite(out.fd, b"A", 0)
    assert target.read_bytes() == b"A" + b"a" * 9 + b"b" * 10 + b"c"
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_stale_temporaries_of_both_name_forms_are_removed_and_links_left_alone(tmp_path):
    target = tmp_path / "img"
    dead = 2**22 + 12345  # beyond pid_max on most machines: not alive
    old_form = tmp_path / f".img.tmp.{dead}"
    new_form = tmp_path / f".img.tmp.{dead}.0123456789abcdef"
    link = tmp_path / f".img.tmp.{dead}.fedcba9876543210"
    old_form.write_bytes(b"x")
    new_form.write_bytes(b"x")
    os.symlink("/etc/passwd", link)
    removed = _atomic.remove_stale_temporaries(str(target))
    assert sorted(removed) == sorted([str(old_form), str(new_form)])
    assert os.path.islink(link)
