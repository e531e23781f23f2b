"""The emulated systemd's tests use liveupdate_systemd, from the ``liveupdate.testing`` plugin.

It is loaded here when the run did not load it already (``-p
liveupdate.testing`` or a top-level ``pytest_plugins``), so that
``pytest tests/manager`` works on its own.
"""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("liveupdate.testing"):
        config.pluginmanager.import_plugin("liveupdate.testing")
