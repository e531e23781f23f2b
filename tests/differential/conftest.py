"""The differential test's end-of-run summary (seeds, counts, timings)."""
from __future__ import annotations

from typing import Callable, List

import pytest

_summary: List[str] = []


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _summary:
        terminalreporter.section("differential test: device vs emulator")
        for line in _summary:
            terminalreporter.write_line(line)


@pytest.fixture
def diff_summary() -> Callable[[str], None]:
    """Record one line for the end-of-run summary (CI logs show it)."""
    return _summary.append
