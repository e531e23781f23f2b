"""Timeouts in seconds, the one reading of them for every caller (private).

A timeout is a number of seconds, 0 or more; ``math.inf`` (or the text
``inf``) means no limit. NaN, a negative number, or a value that is not a
number is EINVAL. Seconds turn into a monotonic deadline, and a deadline into
the milliseconds ``poll()`` takes, capped so that a huge finite timeout such
as 1e300 never overflows a C int: the caller simply polls again.
"""
from __future__ import annotations

import errno
import math
import time

from .errors import make

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Optional

__all__ = ["seconds", "from_text", "deadline_after", "remaining", "poll_ms", "argument"]

#: The longest single poll() (ms): its argument is a C int.
_POLL_MAX_MS = 2**31 - 1


def seconds(timeout: Any, op: str, **args: Any) -> float:
    """``timeout`` as a float (``math.inf`` for no limit).

    Raises OSError EINVAL (naming ``op`` and ``args``) for NaN, a negative
    number, a bool or anything that is not an int or a float."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise make(errno.EINVAL, op, "timeout is a number of seconds", timeout=timeout, **args)
    try:
        value = float(timeout)
    except OverflowError:  # an int too large for a float: longer than forever is forever
        return math.inf if timeout > 0 else -math.inf
    if math.isnan(value) or value < 0:
        raise make(errno.EINVAL, op, "timeout must be 0 or more seconds (inf: no limit)", timeout=timeout, **args)
    return value


def from_text(text: str, op: str, source: str) -> float:
    """A timeout written as text (an environment variable, an option):
    ``5``, ``0.5``, ``1e300``, ``inf``. Raises OSError EINVAL naming
    ``source`` for anything else, NaN and negatives included."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise make(errno.EINVAL, op, f"{source} is not a number of seconds", timeout=text) from None
    try:
        return seconds(value, op)
    except OSError:
        raise make(errno.EINVAL, op, f"{source} must be 0 or more seconds (inf: no limit)",
                   timeout=text) from None


def deadline_after(timeout: Any, op: str) -> Optional[float]:
    """The monotonic deadline ``timeout`` seconds from now; None for no
    limit. Raises OSError EINVAL as :func:`seconds`."""
    value = seconds(timeout, op)
    if math.isinf(value):
        return None
    return time.monotonic() + value


def remaining(deadline: Optional[float]) -> float:
    """Seconds left until ``deadline`` (never below 0; inf for None)."""
    if deadline is None:
        return math.inf
    return max(0.0, deadline - time.monotonic())


def poll_ms(deadline: Optional[float]) -> int:
    """The argument for one ``poll()`` that waits until ``deadline``: -1 for
    no limit, else the milliseconds left rounded up, at most a C int's
    worth (the caller loops until the deadline has really passed)."""
    if deadline is None:
        return -1
    left = deadline - time.monotonic()
    if left <= 0:
        return 0
    return int(min(math.ceil(left * 1000), _POLL_MAX_MS))


def argument(text: str) -> float:
    """An ``argparse`` ``type=`` for ``--timeout SECONDS``: a bad value is
    a usage error (exit status 2) saying what a timeout may be."""
    import argparse

    try:
        return from_text(text, "--timeout", "--timeout")
    except OSError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a timeout: give 0 or more seconds, or inf for no limit") from None
