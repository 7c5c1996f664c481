#!/usr/bin/env bash
# Set up from scratch (if needed) and run the whole test suite:
#   1. on the embedded default (SQLite, in-memory broker);
#   2. then again on PostgreSQL + Redis, the distributed mode, when both answer
#      at 127.0.0.1 (DATABASE_URL_DISTRIBUTED / REDIS_URL_DISTRIBUTED override).
# With STREAMING_REQUIRE_DISTRIBUTED=1 (CI) the second run is a must.
#   PYTHON=/path/to/python3.12 VENV=.venv-py312 scripts/test.sh   # another Python
# DATABASE_URL_EMBEDDED names the first run's SQLite file (default: db.sqlite3
# beside manage.py, so the test database is test_db.sqlite3 there); two runs
# side by side (CI's two Pythons) need one each. SKIP_BOOTSTRAP=1: the venv is
# ready (CI set it up before starting runs side by side).
# Extra arguments go to `manage.py test` (e.g. a test label).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export VENV
if [ "${SKIP_BOOTSTRAP:-0}" != "1" ]; then
  scripts/bootstrap.sh
fi
export PATH="$HOME/.local/bin:$PATH"
if [ "$VENV" = ".venv" ]; then
  run_tests() { poetry run python manage.py test --noinput "$@"; }
else
  run_tests() { "$VENV/bin/python" manage.py test --noinput "$@"; }
fi

echo "==> test suite: SQLite, in-memory broker"
(
  unset DATABASE_URL STREAMING_BROKER_URL STREAMING_REQUIRE_DISTRIBUTED
  if [ -n "${DATABASE_URL_EMBEDDED:-}" ]; then export DATABASE_URL="$DATABASE_URL_EMBEDDED"; fi
  run_tests "$@"
)

pg_url="${DATABASE_URL_DISTRIBUTED:-postgres://postgres@127.0.0.1:5432/test}"
redis_url="${REDIS_URL_DISTRIBUTED:-redis://127.0.0.1:6379/0}"
if "$VENV/bin/python" - "$pg_url" "$redis_url" <<'PY' 2>/dev/null
import sys

import psycopg
import redis

psycopg.connect(sys.argv[1].replace("postgres://", "postgresql://", 1), connect_timeout=3).close()
redis.Redis.from_url(sys.argv[2], socket_timeout=3).ping()
PY
then
  echo "==> test suite: PostgreSQL ($pg_url), Redis broker ($redis_url)"
  DATABASE_URL="$pg_url" STREAMING_BROKER_URL="$redis_url" STREAMING_REQUIRE_DISTRIBUTED=1 run_tests "$@"
elif [ "${STREAMING_REQUIRE_DISTRIBUTED:-0}" = "1" ]; then
  echo "PostgreSQL ($pg_url) or Redis ($redis_url) does not answer, and CI requires the distributed run" >&2
  exit 1
else
  echo "==> PostgreSQL or Redis not reachable: distributed tests skipped."
  echo "    Start PostgreSQL (127.0.0.1:5432, database test) and Redis (127.0.0.1:6379) to run them."
fi
