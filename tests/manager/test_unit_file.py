"""Reading unit files: what the emulated manager plays, and a clear refusal
of everything else (a unit that would behave differently under the real
systemd must not pass silently)."""
from __future__ import annotations

import errno
import os

import pytest

from liveupdate.emulator.systemd.unit_file import luo_session_name_is_valid, load_unit, parse_unit

GOOD = """\
# a comment
; another
[Unit]
Description=A cache
After=network.target \\
      other.service

[Service]
Type=notify
ExecStart=/usr/bin/python3 -u /opt/cache.py serve --socket "/run/a b.sock"
Environment=A=1 "B=two words"
FileDescriptorStoreMax=4
FileDescriptorStorePreserve=yes
LUOSession=zeta alpha
LUOSession=alpha

[Install]
WantedBy=multi-user.target
"""


def test_a_unit_it_plays() -> None:
    unit = parse_unit(GOOD, "cache.service")
    assert unit.description == "A cache"
    assert unit.after == ["network.target", "other.service"]
    assert unit.type == "notify"
    assert unit.exec_start == ["/usr/bin/python3", "-u", "/opt/cache.py", "serve", "--socket", "/run/a b.sock"]
    assert unit.environment == {"A": "1", "B": "two words"}
    assert unit.fd_store_max == 4 and unit.fd_store_preserve == "yes"
    # Sorted and without duplicates, as systemd keeps the list.
    assert unit.luo_sessions == ["alpha", "zeta"]
    # systemd 262 adds one store entry per LUOSession= name.
    assert unit.effective_fd_store_max == 6
    assert unit.effective_notify_access == "main"
    assert unit.carried_through_kexec
    assert unit.wanted_by == ["multi-user.target"]


def test_an_empty_assignment_resets_a_list() -> None:
    unit = parse_unit(GOOD + "[Service]\nLUOSession=\n", "cache.service")
    assert unit.luo_sessions == []


@pytest.mark.parametrize("line,why", [
    ("Restart=always", "[Service] Restart= is not played"),
    ("User=nobody", "[Service] User= is not played"),
    ("FileDescriptorStoreMax=lots", "FileDescriptorStoreMax= takes a number"),
    ("FileDescriptorStorePreserve=maybe", "FileDescriptorStorePreserve= takes one of no, yes, restart, on-success"),
    ("Type=forking", "Type= takes one of notify, simple, exec"),
    ("LUOSession=a:b", "LUOSession= name 'a:b' is not valid"),
    ("ExecStart=-/bin/true", "prefix '-' is not played"),
    ("ExecStart=/bin/true", "ExecStart= is given twice"),
    ("no equals sign", "expected Key=Value"),
])
def test_what_it_does_not_play_is_refused_with_file_and_line(line: str, why: str) -> None:
    text = GOOD.replace("[Install]", line + "\n[Install]")
    with pytest.raises(OSError) as info:
        parse_unit(text, "cache.service", "deploy/cache.service")
    assert info.value.errno == errno.EINVAL
    assert "deploy/cache.service:17" in str(info.value)
    assert why in str(info.value)


def test_unknown_sections_and_keys_before_any() -> None:
    with pytest.raises(OSError, match=r"section \[Socket\] is not played"):
        parse_unit("[Socket]\nListenStream=/run/x\n", "x.service")
    with pytest.raises(OSError, match="comes before any"):
        parse_unit("Type=notify\n", "x.service")
    with pytest.raises(OSError, match="no ExecStart"):
        parse_unit("[Service]\nType=notify\n", "x.service")
    with pytest.raises(OSError, match="NAME.service"):
        parse_unit(GOOD, "cache.socket")


@pytest.mark.parametrize("name,valid", [
    ("libd", True), ("a/b.c", True), ("x" * 255, True), ("", False), ("x" * 256, False),
    ("a b", False), ("a:b", False), ("a\\b", False), ('a"b', False), ("a'b", False),
    ("a*b", False), ("a?b", False), ("a[b", False), ("é", False), ("tab\t", False),
])
def test_luosession_names(name: str, valid: bool) -> None:
    assert luo_session_name_is_valid(name) is valid


def test_loading_refuses_what_is_not_a_regular_file(tmp_path) -> None:
    fifo = tmp_path / "unit.service"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        load_unit(str(fifo))  # must not block on the FIFO
    assert info.value.errno == errno.EINVAL and "regular file" in str(info.value)
    big = tmp_path / "big.service"
    big.write_text("#" * (2 << 20))
    with pytest.raises(OSError) as info:
        load_unit(str(big))
    assert info.value.errno == errno.EFBIG


def test_loading_names_the_unit_after_its_file(tmp_path) -> None:
    path = tmp_path / "cache.service"
    path.write_text(GOOD)
    assert load_unit(str(path)).name == "cache.service"
