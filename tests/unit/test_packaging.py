"""The package's metadata says what is true of it: the packages it ships,
one version, the Pythons it supports (as the README says), its license and
what its sdist carries so that the suite runs from it. .ci/run builds the
sdist and runs the tests from it with the lowest allowed dependencies."""
from __future__ import annotations

import os
import re
import sys

import pytest

import liveupdate

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib  # type: ignore[no-redef]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLDEST, NEWEST = (3, 10), (3, 15)


def _read(name: str) -> str:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def project():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_of_the_tree_is_shipped(project):
    found = {"liveupdate.cdefs"}
    for root, dirs, files in os.walk(os.path.join(REPO, "liveupdate")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.add(os.path.relpath(root, REPO).replace(os.sep, "."))
    assert sorted(project["tool"]["setuptools"]["packages"]) == sorted(found)


def test_the_version_has_one_source(project):
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "liveupdate.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", liveupdate.__version__)
    assert "(%s)" % liveupdate.__version__ in _read("CHANGELOG.md")


def test_the_supported_pythons_agree_everywhere(project):
    meta = project["project"]
    assert meta["requires-python"] == ">=%d.%d" % OLDEST
    listed = sorted(tuple(int(p) for p in c.rsplit(" ", 1)[1].split("."))
                    for c in meta["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert listed == [(3, minor) for minor in range(OLDEST[1], NEWEST[1] + 1)]
    assert "Python %d.%d to %d.%d on Linux" % (OLDEST + NEWEST) in _read("README.md")
    assert OLDEST <= sys.version_info[:2] <= NEWEST, "this Python is outside the supported range"


def test_the_license_is_the_mit_text(project):
    assert project["project"]["license"] == "MIT" and project["project"]["license-files"] == ["LICENSE"]
    text = _read("LICENSE")
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text


def test_the_sdist_carries_what_the_suite_needs():
    manifest = _read("MANIFEST.in").splitlines()
    for needed in ("graft tests", "graft examples", "graft tools", "graft cdefs"):
        assert needed in manifest
    assert "pytest.ini" in next(line for line in manifest if line.startswith("include ")).split()


def test_the_test_floors(project):
    test = dict(re.match(r"([a-z]+)(.*)", req).groups() for req in project["project"]["optional-dependencies"]["test"])
    # Up to 6.100.2, tests/emulator/test_properties.py runs for over 400 s.
    assert test["hypothesis"].startswith(">=6.100.3,")
