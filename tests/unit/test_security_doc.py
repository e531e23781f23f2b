"""SECURITY.md says how the service is meant to be exposed, ships in the
sdist, and the README's security section points at it."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(name: str) -> str:
    with open(os.path.join(REPO, name), encoding="utf-8") as src:
        return src.read()


def test_security_md_covers_the_service():
    text = _read("SECURITY.md")
    for needed in ("0700", "0600", "SO_PEERCRED", "EACCES", "Limits of the emulator service", "Reporting"):
        assert needed in text, needed


def test_the_sdist_carries_it():
    include = next(line for line in _read("MANIFEST.in").splitlines() if line.startswith("include "))
    assert "SECURITY.md" in include.split()


def test_the_readme_section_follows_the_service_and_links_it():
    readme = _read("README.md")
    service = readme.index("### Several processes, one emulated kernel: the service")
    security = readme.index("### Security model of the emulator service")
    assert service < security < readme.index("## Testing your own live update")
    assert "[SECURITY.md](SECURITY.md)" in readme[security:]
