"""Reading what a forked test child reports back through a pipe."""
from __future__ import annotations

import json
import os
from typing import Any, Dict


def collect(read_end: int, pid: int) -> Dict[str, Any]:
    """Read the child's JSON report to EOF, reap the child, return the report."""
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks).decode())
