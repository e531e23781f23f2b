"""``liveupdate inspect IMAGE``: what one kernel hands the next, decoded.

Reads a preserved-memory image written by the emulator (``emulator serve
--image``, ``Emulator.kexec(image=...)``, ``Emulator.save_image``) without
booting it, and shows the LUO root, each block chain with its blocks and
counts, each session and each file with its token, handler and memfd size.
Anything that does not check out is listed as a problem rather than hidden:
that is the point of looking.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from typing import Any, Callable, Dict, Optional, TextIO

from ._common import fail
from .inspect_systemd import SESSION as SYSTEMD_SESSION, render_mapping, systemd_mapping

__all__ = ["add_parser", "decode", "render_text"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="decode a preserved-memory image",
        description="Decode a preserved-memory image of the emulator: root, block chains, sessions, files.",
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (emulator serve --image, Emulator.save_image)")
    parser.add_argument("--json", action="store_true", help="print one JSON document for machines")
    parser.set_defaults(func=run)


def seal_names(seals: int) -> str:
    """F_SEAL_* bits as words (see liveupdate.emulator.memfd_luo.seal_names)."""
    from ..emulator.memfd_luo import seal_names as names

    return names(seals)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _progress(image_path: str) -> "Callable[[int, int], None]":
    """Progress lines on stderr while a large image is read (the reader
    reports every 64 MiB, so small images print none)."""
    def report(done: int, total: int) -> None:
        sys.stderr.write(f"liveupdate inspect: reading {image_path}: {done >> 20} of {total >> 20} MiB\n")
        sys.stderr.flush()

    return report


def decode(image_path: str, progress: "Optional[Callable[[int, int], None]]" = None) -> Dict[str, Any]:
    """The image as plain data: ``{"image", "subtrees", "root", "chains",
    "sessions", "problems", "systemd"}``; sessions hold their files, files
    their memfd; ``systemd`` is the decoded mapping of a ``systemd`` session
    (see inspect_systemd), or None.

    Raises OSError: ENOEXEC for a file that is no image, or the errno of
    reading it."""
    from ..emulator.image import load

    # By module path: the emulator package re-exports the function walk()
    # under the same name as its module.
    walk = importlib.import_module("liveupdate.emulator.walk")
    memory = load(image_path, progress)
    doc: Dict[str, Any] = {"image": image_path, "subtrees": [], "root": None, "chains": [], "sessions": [],
                           "problems": []}
    chains: Dict[str, Dict[str, Any]] = {}
    session = None
    for record in walk.walk(memory):
        if isinstance(record, walk.Subtree):
            doc["subtrees"].append({"name": record.name, "pa": record.pa, "size": record.size})
        elif isinstance(record, walk.Root):
            doc["root"] = {"pa": record.pa, "compatible": _text(record.compatible),
                           "liveupdate_num": record.liveupdate_num, "sessions_pa": record.sessions_pa,
                           "flbs_pa": record.flbs_pa}
        elif isinstance(record, walk.Block):
            chain = chains.get(record.chain)
            if chain is None:
                chain = chains[record.chain] = {"chain": record.chain, "capacity": record.capacity, "blocks": []}
                doc["chains"].append(chain)
            chain["blocks"].append({"index": record.index, "pa": record.pa, "next": record.next,
                                    "count": record.count})
        elif isinstance(record, walk.Session):
            session = {"name": _text(record.name), "pa": record.pa, "files_pa": record.files_pa,
                       "files_count": record.files_count, "files": []}
            doc["sessions"].append(session)
        elif isinstance(record, walk.File):
            entry = {"token": record.token, "token_hex": f"{record.token:#x}", "handler": _text(record.compatible),
                     "pa": record.pa, "data": record.data, "memfd": None}
            if session is not None:
                session["files"].append(entry)
        elif isinstance(record, walk.Problem):
            doc["problems"].append({"where": record.where, "problem": record.message})
        elif hasattr(record, "inspect_key"):
            # A file handler's own record (memfd: walk.Memfd), under its key.
            if session is not None and session["files"] and session["files"][-1]["token"] == record.token:
                entry = session["files"][-1]
                entry[record.inspect_key] = record.inspect_fields()
                entry["summary"] = record.inspect_summary()
    doc["systemd"] = systemd_mapping(memory, doc)  # after the walk: booting may change the memory
    return doc


def render_text(doc: Dict[str, Any], out: TextIO) -> None:
    """The decoded image for people."""
    w = out.write
    w(f"image {doc['image']}\n")
    root = doc["root"]
    if root is None:
        w("  no LUO root: the next kernel would boot as a first boot (nothing preserved)\n")
    else:
        w(f"  root at {root['pa']:#x}: compatible {root['compatible']!r}, liveupdate number "
          f"{root['liveupdate_num']}, sessions at {root['sessions_pa']:#x}\n")
    for chain in doc["chains"]:
        blocks = chain["blocks"]
        total = sum(b["count"] for b in blocks)
        w(f"  chain {chain['chain']}: {len(blocks)} block(s), {total} entries ({chain['capacity']} per block)\n")
        for block in blocks:
            w(f"    block {block['index']} at {block['pa']:#x}: {block['count']} entries, next "
              f"{block['next']:#x}\n")
    w(f"  {len(doc['sessions'])} session(s)\n")
    for session in doc["sessions"]:
        w(f"  session {session['name']!r}: {session['files_count']} file(s)\n")
        for entry in session["files"]:
            line = f"    token {entry['token']} ({entry['token_hex']}): {entry['handler']}"
            if entry.get("summary"):
                line += ", " + entry["summary"]
            w(line + "\n")
        if session["name"] == SYSTEMD_SESSION and doc.get("systemd") is not None:
            render_mapping(doc["systemd"], out)
    for problem in doc["problems"]:
        w(f"  PROBLEM in {problem['where']}: {problem['problem']}\n")


def run(args: argparse.Namespace) -> int:
    try:
        doc = decode(args.image, _progress(args.image))
    except OSError as exc:
        raise fail(exc, "give a file written by `liveupdate emulator serve --image` or Emulator.save_image()"
                   if exc.errno in (errno.ENOEXEC, errno.EISDIR) else None) from None
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render_text(doc, sys.stdout)
    return 1 if doc["problems"] else 0
