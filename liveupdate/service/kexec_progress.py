"""Progress of ``liveupdate emulator kexec`` while the service writes its image.

The kexec request is one call that returns when the service is done; for a
large image that is seconds to minutes of silence. The command runs the
call on a thread and, every ``every`` seconds while it waits, reports how
far the service's temporary image file has grown (it is written in the
image's directory as ``.NAME.tmp.*``, see :mod:`liveupdate._atomic`), so
no change of the wire protocol is needed.
"""
from __future__ import annotations

import glob
import os
import threading
import time
from typing import Any, Callable, Dict, Optional

__all__ = ["with_progress"]


def _writing(image: str) -> int:
    """Bytes written so far to the newest temporary of ``image`` (-1: none)."""
    directory, name = os.path.split(image)
    best, size = 0.0, -1
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp.*")):
        try:
            st = os.lstat(tmp)
        except OSError:
            continue
        if st.st_mtime >= best:
            best, size = st.st_mtime, st.st_size
    return size


def with_progress(call: Callable[[], Dict[str, Any]], image: Optional[str], say: Callable[[str], None],
                  every: float = 2.0) -> Dict[str, Any]:
    """``call()``, reporting through ``say`` every ``every`` seconds while
    it runs. Raises what ``call`` raises."""
    result: Dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # handed to the caller's thread below
            result["error"] = exc

    thread = threading.Thread(target=run, name="liveupdate-kexec", daemon=True)
    start = time.monotonic()
    thread.start()
    while True:
        thread.join(every)
        if not thread.is_alive():
            break
        elapsed = time.monotonic() - start
        size = _writing(image) if image else -1
        if size >= 0:
            say(f"liveupdate emulator kexec: the service is writing its image {image}: "
                f"{size / (1 << 20):.0f} MiB so far ({elapsed:.0f} s)")
        else:
            say(f"liveupdate emulator kexec: waiting for the service ({elapsed:.0f} s)")
    if "error" in result:
        raise result["error"]
    value: Dict[str, Any] = result["value"]
    return value
