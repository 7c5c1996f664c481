#!/usr/bin/env bash
# Set up the project from scratch: poetry (if missing), a virtualenv in .venv
# with every package pinned by poetry.lock, and the project itself.
#   scripts/bootstrap.sh                # default python3
#   PYTHON=python3.12 VENV=.venv-py312 scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
POETRY_VERSION="2.5.1"

if ! command -v poetry >/dev/null 2>&1; then
  POETRY_HOME="${POETRY_HOME:-$HOME/.local/share/poetry-venv}"
  if [ ! -x "$POETRY_HOME/bin/poetry" ]; then
    echo "==> installing poetry $POETRY_VERSION into $POETRY_HOME"
    python3 -m venv "$POETRY_HOME"
    "$POETRY_HOME/bin/pip" install --quiet "poetry==$POETRY_VERSION"
  fi
  mkdir -p "$HOME/.local/bin"
  ln -sf "$POETRY_HOME/bin/poetry" "$HOME/.local/bin/poetry"
  export PATH="$HOME/.local/bin:$PATH"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# pip reads the index through the simple API, which every mirror serves; the
# hashes come from poetry.lock, so this installs exactly the locked set.
echo "==> installing locked dependencies"
"$VENV/bin/python" scripts/lock_requirements.py > "$VENV/requirements.lock.txt"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --require-hashes -r "$VENV/requirements.lock.txt"
# poetry now finds every locked package in place and adds the project itself
# (every extra and the dev group, as CI tests them); VIRTUAL_ENV points it at
# $VENV rather than the project's .venv.
VIRTUAL_ENV="$(cd "$VENV" && pwd)" poetry install --all-extras --quiet
echo "==> ready: $VENV ($("$VENV/bin/python" --version))"
