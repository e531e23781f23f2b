"""tools/vm/systemd_image.py without building anything: the systemd version
check and the cache keys (the expensive layers are reused only while their
inputs are the same)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools", "vm"))
import systemd_image  # noqa: E402


@pytest.mark.parametrize("version", ["262.1-1", "261-1", "1:262.1-1", "300"])
def test_a_systemd_that_speaks_live_update_passes(version: str) -> None:
    assert systemd_image.check_systemd({"systemd": version}, "base.tar") == version


@pytest.mark.parametrize("version", ["257.9-1~deb13u1", "260.4-2", "garbage"])
def test_an_older_systemd_fails_in_one_line(version: str) -> None:
    with pytest.raises(systemd_image.BuildError) as info:
        systemd_image.check_systemd({"systemd": version}, "base.tar")
    message = str(info.value)
    assert "needs systemd >= 261" in message and version in message and "\n" not in message


def test_no_systemd_at_all() -> None:
    with pytest.raises(systemd_image.BuildError, match="no systemd package"):
        systemd_image.check_systemd({"python3": "3.14"}, "base.tar")


def test_the_base_key_depends_on_the_recipe_only(monkeypatch) -> None:
    key = systemd_image.base_key()
    assert key == systemd_image.base_key()
    monkeypatch.setattr(systemd_image, "PACKAGES", systemd_image.PACKAGES + ["strace"])
    assert systemd_image.base_key() != key


def test_the_image_key_follows_the_project_and_the_kernel(tmp_path, monkeypatch) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"a kernel")
    key = systemd_image.image_key("base-x.tar", str(kernel))
    assert key == systemd_image.image_key("base-x.tar", str(kernel))
    assert systemd_image.image_key("base-y.tar", str(kernel)) != key
    kernel.write_bytes(b"another kernel")
    assert systemd_image.image_key("base-x.tar", str(kernel)) != key
    files = systemd_image.project_files()
    assert "liveupdate/__init__.py" in files and "pyproject.toml" in files
    assert not any("__pycache__" in f for f in files)
