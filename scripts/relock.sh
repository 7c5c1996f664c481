#!/usr/bin/env bash
# Re-resolve poetry.lock on a machine whose package index serves only the
# simple API (PEP 503/691), not PyPI's per-version JSON that poetry's default
# source needs. The index URL comes from the environment (RELOCK_INDEX_URL) so
# it never lands in pyproject.toml or poetry.lock; the lock written here is the
# same one a plain `poetry lock` writes against PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RELOCK_INDEX_URL:?set RELOCK_INDEX_URL to the simple index URL}"
cp pyproject.toml /tmp/pyproject.relock.bak
trap 'cp /tmp/pyproject.relock.bak pyproject.toml' EXIT
printf '\n[[tool.poetry.source]]\nname = "relock"\nurl = "%s"\npriority = "primary"\n' \
  "$RELOCK_INDEX_URL" >> pyproject.toml
poetry lock
cp /tmp/pyproject.relock.bak pyproject.toml
POETRY_PYTHON="$(dirname "$(readlink -f "$(command -v poetry)")")/python"
"$POETRY_PYTHON" - <<'PY'
import re
from pathlib import Path
import tomllib
from poetry.packages.locker import Locker

lock = Path("poetry.lock")
text = re.sub(r'\n\[package\.source\]\ntype = "legacy"\nurl = "[^"]*"\nreference = "relock"\n', "\n", lock.read_text())
pyproject = tomllib.loads(Path("pyproject.toml").read_text())
content_hash = Locker(lock, pyproject)._get_content_hash()
text = re.sub(r'content-hash = "[0-9a-f]+"', f'content-hash = "{content_hash}"', text)
lock.write_text(text)
PY
poetry check --lock
