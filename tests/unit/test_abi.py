"""The uapi layout, checked against the facts of <linux/liveupdate.h> (Linux 7.3)."""
from __future__ import annotations

import pytest

from liveupdate import _abi

ffi = _abi.ffi

SIZES = {
    "struct liveupdate_ioctl_create_session": 72,
    "struct liveupdate_ioctl_retrieve_session": 72,
    "struct liveupdate_session_preserve_fd": 16,
    "struct liveupdate_session_retrieve_fd": 16,
    "struct liveupdate_session_finish": 8,
    "struct liveupdate_session_get_name": 72,
}

OFFSETS = [
    ("struct liveupdate_ioctl_create_session", "size", 0),
    ("struct liveupdate_ioctl_create_session", "fd", 4),
    ("struct liveupdate_ioctl_create_session", "name", 8),
    ("struct liveupdate_ioctl_retrieve_session", "size", 0),
    ("struct liveupdate_ioctl_retrieve_session", "fd", 4),
    ("struct liveupdate_ioctl_retrieve_session", "name", 8),
    ("struct liveupdate_session_preserve_fd", "size", 0),
    ("struct liveupdate_session_preserve_fd", "fd", 4),
    ("struct liveupdate_session_preserve_fd", "token", 8),
    ("struct liveupdate_session_retrieve_fd", "size", 0),
    ("struct liveupdate_session_retrieve_fd", "fd", 4),
    ("struct liveupdate_session_retrieve_fd", "token", 8),
    ("struct liveupdate_session_finish", "size", 0),
    ("struct liveupdate_session_finish", "reserved", 4),
    ("struct liveupdate_session_get_name", "size", 0),
    ("struct liveupdate_session_get_name", "reserved", 4),
    ("struct liveupdate_session_get_name", "name", 8),
]

# _IO(0xBA, nr): direction 0, size 0, type 0xBA in bits 8-15, nr in bits 0-7.
NUMBERS = {
    "LIVEUPDATE_IOCTL_CREATE_SESSION": 0xBA00,
    "LIVEUPDATE_IOCTL_RETRIEVE_SESSION": 0xBA01,
    "LIVEUPDATE_SESSION_PRESERVE_FD": 0xBA40,
    "LIVEUPDATE_SESSION_RETRIEVE_FD": 0xBA41,
    "LIVEUPDATE_SESSION_FINISH": 0xBA42,
    "LIVEUPDATE_SESSION_GET_NAME": 0xBA43,
}


@pytest.mark.parametrize("ctype,size", SIZES.items())
def test_struct_sizes_in_cdefs(ctype, size):
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize("ctype,size", SIZES.items())
def test_packers_match_sizes(ctype, size):
    assert _abi.LAYOUTS[ctype][0].size == size


@pytest.mark.parametrize("ctype,field,offset", OFFSETS)
def test_field_offsets(ctype, field, offset):
    assert ffi.offsetof(ctype, field) == offset


def test_name_length():
    assert _abi.NAME_LENGTH == 64
    assert _abi.NAME_MAX == 63
    assert ffi.sizeof(ffi.typeof("struct liveupdate_ioctl_create_session").fields[2][1].type) == 64


@pytest.mark.parametrize("name,number", NUMBERS.items())
def test_ioctl_numbers(name, number):
    assert _abi.COMMANDS[name] == number


def test_all_six_commands_are_declared():
    assert len(_abi.COMMANDS) == 6 == len(set(_abi.COMMANDS.values()))


def test_token_field_is_unsigned_64_bit():
    assert ffi.typeof("struct liveupdate_session_preserve_fd").fields[2][1].type.cname == "uint64_t"


def test_packers_put_fields_where_cffi_does():
    raw = _abi.PRESERVE_FD.pack(16, 7, 0x1122334455667788)
    view = ffi.from_buffer("struct liveupdate_session_preserve_fd *", bytearray(raw))
    assert (view.size, view.fd, view.token) == (16, 7, 0x1122334455667788)
    raw = _abi.CREATE_SESSION.pack(72, -1, b"abc")
    view = ffi.from_buffer("struct liveupdate_ioctl_create_session *", bytearray(raw))
    assert (view.size, view.fd, bytes(view.name[0:4])) == (72, -1, b"abc\0")


def test_cdefs_header_is_shipped_next_to_the_code():
    import os

    assert os.path.isfile(_abi.cdefs_path("liveupdate.h"))
    with pytest.raises(ImportError):
        _abi.cdefs_path("no-such-header.h")


def test_what_import_reads_of_the_header_is_what_cffi_parses():
    # check_layouts() compares every constant read at import without cffi
    # (the numbers, the name length) and every packer with cffi's view.
    _abi.check_layouts()
    lib = ffi.dlopen(None)
    assert _abi.IOCTL_TYPE == lib.LIVEUPDATE_IOCTL_TYPE
    assert _abi.NAME_LENGTH == lib.LIVEUPDATE_SESSION_NAME_LENGTH


def test_check_layouts_catches_a_drifted_packer(monkeypatch):
    import struct

    monkeypatch.setitem(_abi.LAYOUTS, "struct liveupdate_session_finish", (struct.Struct("=III"), []))
    with pytest.raises(ImportError, match="struct liveupdate_session_finish is 8 bytes in cdefs, 12"):
        _abi.check_layouts()


@pytest.mark.parametrize("command", _abi.COMMAND_TABLE, ids=lambda c: c.name)
def test_the_command_table_agrees_with_cffi(command):
    assert ffi.sizeof(command.ctype) == command.size
    for field, offset, size in command.fields:
        assert ffi.offsetof(command.ctype, field) == offset
        assert ffi.sizeof(ffi.typeof(command.ctype).fields[[f for f, _ in ffi.typeof(command.ctype).fields].index(field)][1].type) == size
    if command.fd_result is not None:
        assert ffi.offsetof(command.ctype, "fd") == command.fd_result


def test_the_command_table_has_the_kernels_minimum_sizes():
    # offsetofend() of the last field the kernel's IOCTL_OP rows name.
    assert {c.name: c.min_size for c in _abi.COMMAND_TABLE} == {
        "LIVEUPDATE_IOCTL_CREATE_SESSION": 72, "LIVEUPDATE_IOCTL_RETRIEVE_SESSION": 72,
        "LIVEUPDATE_SESSION_PRESERVE_FD": 16, "LIVEUPDATE_SESSION_RETRIEVE_FD": 16,
        "LIVEUPDATE_SESSION_FINISH": 8, "LIVEUPDATE_SESSION_GET_NAME": 72}
    assert {c.name: c.states for c in _abi.COMMAND_TABLE if c.target == "session"} == {
        "LIVEUPDATE_SESSION_PRESERVE_FD": ("outgoing",), "LIVEUPDATE_SESSION_RETRIEVE_FD": ("incoming",),
        "LIVEUPDATE_SESSION_FINISH": ("incoming",), "LIVEUPDATE_SESSION_GET_NAME": ("outgoing", "incoming")}


def test_importing_the_package_does_not_load_cffi():
    import subprocess
    import sys

    code = "import sys, liveupdate; s = liveupdate.Session; print(sorted(m for m in sys.modules if m.split('.')[0] in ('cffi', 'pycparser')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
