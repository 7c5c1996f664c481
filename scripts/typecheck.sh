#!/usr/bin/env bash
# Type-check the library (the `streaming` package) with mypy and mypy.ini.
#   scripts/typecheck.sh                  # with .venv
#   VENV=.venv-py312 scripts/typecheck.sh # another venv (Python 3.12, Django 6)
# Extra arguments go to mypy (e.g. --no-incremental). Exits non-zero on any error.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
exec "$VENV/bin/python" -m mypy --config-file mypy.ini "$@"
