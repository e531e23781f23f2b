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
    assert _abi.cdefs_path("liveupdate.h").is_file()
    with pytest.raises(ImportError):
        _abi.cdefs_path("no-such-header.h")
