#!/usr/bin/env bash
# Set up from scratch (if needed) and run the whole test suite.
#   scripts/test.sh                                   # Python 3 default, Django 5.2, via poetry
#   PYTHON=/path/to/python3.12 VENV=.venv-py312 scripts/test.sh   # Django 6 on Python 3.12+
# Extra arguments go to `manage.py test` (e.g. a test label).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export VENV
scripts/bootstrap.sh
export PATH="$HOME/.local/bin:$PATH"
if [ "$VENV" = ".venv" ]; then
  exec poetry run python manage.py test --noinput "$@"
else
  exec "$VENV/bin/python" manage.py test --noinput "$@"
fi
