#!/usr/bin/env python3
"""Print pip constraints pinning each dependency of pyproject.toml (the
package's and its "test" extra's) to the lowest version it allows, so that
CI can prove the floors: ``pip install -c <(.ci/lowest_requirements.py) ...``.

Every requirement must have a ``>=`` floor: one without is an error here,
since nothing would then say which oldest version is meant to work.
"""
import os
import re
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")


def main() -> int:
    with open(PYPROJECT, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    for requirement in requirements:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", requirement)
        floors = re.findall(r">=\s*([0-9][0-9A-Za-z.]*)", m.group(2)) if m else []
        if len(floors) != 1:
            print("lowest_requirements: %r has no single >= floor" % requirement, file=sys.stderr)
            return 1
        print("%s==%s" % (m.group(1), floors[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
