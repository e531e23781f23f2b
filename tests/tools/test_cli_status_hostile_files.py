"""``liveupdate status --json`` on hostile files: a truncated, corrupt,
non-gzip or bomb /proc/config.gz, a config or command line that is
/dev/zero or a FIFO, a kernel log that never ends. The output stays valid
JSON, each damaged file is named for what it is (never "missing"), and the
process stays small (its peak RSS is measured; no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from .test_cli_status import GOOD_CONFIG, build_tree, tree_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Far above what status needs (~30 MB here), far below what reading the
#: bomb whole takes (its 256 MiB, twice over).
RSS_LIMIT_KB = 150 * 1024

# VmHWM, not getrusage's ru_maxrss: that one carries the forking parent's
# peak (pytest's, after a long run) into the child.
RUN = """
import sys
from liveupdate.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
with open("/proc/self/status") as status:
    hwm = next(line for line in status if line.startswith("VmHWM:")).split()[1]
sys.stderr.write("maxrss=%s\\n" % hwm)
sys.exit(code)
"""


def status(roots) -> Tuple[Dict[str, Any], int]:
    done = subprocess.run([sys.executable, "-c", RUN, "status", "--json", *tree_args(roots)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rss = int(done.stderr.rsplit("maxrss=", 1)[1])
    return json.loads(done.stdout), rss


def check(report: Dict[str, Any], ident: str) -> Dict[str, Any]:
    return next(c for c in report["checks"] if c["id"] == ident)


def _bomb(path: Path, size: int) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as out:
        for _ in range(size >> 20):
            out.write(packer.compress(zeros))
        out.write(packer.flush())


@pytest.mark.parametrize("damage, says", [
    ("truncated", "truncated gzip data"),
    ("corrupt", "corrupt gzip data"),
    ("plain", "not gzip data"),
    ("empty", "empty, not gzip data"),
    ("bomb", "decompresses to more than 16 MiB"),
    ("zero", "a device, not a regular file"),
    ("fifo", "a FIFO, not a regular file"),
    ("huge", "larger than"),
])
def test_a_damaged_config_gz_is_named_for_what_it_is(tmp_path, damage, says):
    roots = build_tree(tmp_path)
    config = Path(roots.proc) / "config.gz"
    packed = config.read_bytes()
    config.unlink()
    if damage == "truncated":
        config.write_bytes(packed[: len(packed) // 2])
    elif damage == "corrupt":
        config.write_bytes(packed[:10] + b"\xff" * 64 + packed[74:])
    elif damage == "plain":
        config.write_text(GOOD_CONFIG)
    elif damage == "empty":
        config.write_bytes(b"")
    elif damage == "bomb":
        _bomb(config, 256 << 20)
    elif damage == "zero":
        os.symlink("/dev/zero", config)
    elif damage == "fifo":
        os.mkfifo(config)
    else:
        with open(config, "wb") as out:
            out.truncate(8 << 30)  # sparse: 8 GiB that cost no disk
    report, rss = status(roots)
    found = check(report, "config")
    assert found["status"] == "unknown", found
    assert says in found["text"] and str(config) in found["text"], found["text"]
    assert "not readable here" not in found["text"]
    assert rss < RSS_LIMIT_KB, f"peak RSS {rss} KB"


def test_a_damaged_config_gz_gives_way_to_the_one_in_boot(tmp_path):
    roots = build_tree(tmp_path, config_in_boot=True)
    (Path(roots.proc) / "config.gz").write_text("not gzip")
    report, _ = status(roots)
    found = check(report, "config")
    assert found["status"] == "ok" and "config-7.3.4" in found["data"]["source"]
    assert "ignored" in found["text"] and "not gzip data" in found["text"]


@pytest.mark.parametrize("target", ["zero", "fifo"])
def test_a_config_in_boot_that_never_ends_is_refused(tmp_path, target):
    roots = build_tree(tmp_path, config=None)
    path = Path(roots.boot) / "config-7.3.4"
    if target == "zero":
        os.symlink("/dev/zero", path)
    else:
        os.mkfifo(path)
    report, rss = status(roots)
    assert check(report, "config")["status"] == "unknown"
    assert "not a regular file" in check(report, "config")["text"]
    assert rss < RSS_LIMIT_KB


@pytest.mark.parametrize("target", ["zero", "fifo", "huge"])
def test_a_command_line_that_never_ends_is_unknown(tmp_path, target):
    roots = build_tree(tmp_path)
    cmdline = Path(roots.proc) / "cmdline"
    cmdline.unlink()
    if target == "zero":
        os.symlink("/dev/zero", cmdline)
    elif target == "fifo":
        os.mkfifo(cmdline)
    else:
        cmdline.write_text("liveupdate=on " * 100_000)
    report, rss = status(roots)
    found = check(report, "cmdline")
    assert found["status"] == "unknown" and "cannot read" in found["text"], found
    assert rss < RSS_LIMIT_KB


def test_a_kernel_log_that_never_ends_is_read_bounded(tmp_path):
    roots = build_tree(tmp_path)
    kmsg = Path(roots.dev) / "kmsg"
    kmsg.unlink()
    os.symlink("/dev/zero", kmsg)
    report, rss = status(roots)
    assert check(report, "number")["status"] in ("info", "unknown")
    assert rss < RSS_LIMIT_KB


def test_the_kernel_log_keeps_what_the_number_needs(tmp_path):
    roots = build_tree(tmp_path, log=["5,0,0,-;Linux version 7.3.4"] + ["6,%d,0,-;noise %d" % (i, i)
                                                                        for i in range(1, 5000)]
                       + ["6,5000,0,-;luo_core: liveupdate number: 7"])
    report, _ = status(roots)
    assert report["liveupdate_number"]["value"] == 7
