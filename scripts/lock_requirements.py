"""Print poetry.lock as a pip requirements file (pinned, with hashes) for this Python.

scripts/bootstrap.sh installs these with pip before `poetry install`, because
pip reads the package index through the simple API alone, which is all that some
mirrors serve; `poetry install` then finds every locked package in place.

The set is what `poetry install --all-extras` (every group, every extra) puts
in a virtualenv of the Python that runs this script: each package's markers
are evaluated here, so run it with the virtualenv's own Python. A package is
needed if the marker of any of its groups applies (a group that the lock lists
without a marker needs it unconditionally), with every extra switched on.
"""

import platform
import sys
import tomllib
from pathlib import Path

try:
    from packaging.markers import Marker
except ImportError:  # a new virtualenv: only pip is there, with its own copy
    from pip._vendor.packaging.markers import Marker

root = Path(__file__).resolve().parent.parent
lock = tomllib.loads((root / "poetry.lock").read_text())
extras = tomllib.loads((root / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
# "" stands for no extra at all: a marker without an extra clause evaluates the same either way.
environments = [{"extra": name} for name in ["", *extras]]


def applies(marker: str | None) -> bool:
    if marker is None:
        return True
    parsed = Marker(marker)
    return any(parsed.evaluate(environment) for environment in environments)


sys.stdout.write(f"# poetry.lock for Python {platform.python_version()} on {sys.platform}, every extra\n")
for package in lock["package"]:
    markers = package.get("markers")
    if isinstance(markers, dict):  # per group; a group without an entry has no marker
        group_markers = [markers.get(group) for group in package["groups"]]
    else:
        group_markers = [markers]
    if not any(applies(marker) for marker in group_markers):
        continue
    hashes = " ".join(f"--hash={f['hash']}" for f in package.get("files", []))
    sys.stdout.write(f"{package['name']}=={package['version']} {hashes}\n")
