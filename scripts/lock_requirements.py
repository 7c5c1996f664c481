"""Print poetry.lock as a pip requirements file (pinned, with hashes and markers).

scripts/bootstrap.sh installs these with pip before `poetry install`, because
pip reads the package index through the simple API alone, which is all that some
mirrors serve; `poetry install` then finds every locked package in place.
"""

import sys
import tomllib
from pathlib import Path

lock = tomllib.loads((Path(__file__).resolve().parent.parent / "poetry.lock").read_text())
for package in lock["package"]:
    markers = package.get("markers")
    if isinstance(markers, dict):  # per-group markers: the package is needed if any applies
        markers = " or ".join(f"({m})" for m in markers.values())
    line = f"{package['name']}=={package['version']}"
    if markers:
        line += f" ; {markers}"
    hashes = " ".join(f"--hash={f['hash']}" for f in package.get("files", []))
    sys.stdout.write(f"{line} {hashes}\n")
