#!/usr/bin/env bash
# Set up from scratch (if needed), migrate, queue two demo tasks and start the
# streaming server on 127.0.0.1:8888 (the embedded default: SQLite, no services).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
path_hint=""
if ! command -v poetry >/dev/null; then
  # Installed by bootstrap.sh into ~/.local/bin, which this shell's PATH lacks.
  path_hint=' (poetry is in ~/.local/bin: export PATH="$HOME/.local/bin:$PATH" there first)'
fi
export PATH="$HOME/.local/bin:$PATH"
PORT="${PORT:-8888}"
# The demo runs in development mode: DEBUG serves the admin's static files.
export DJANGO_DEBUG="${DJANGO_DEBUG:-1}"
poetry run python manage.py migrate --noinput
example=$(poetry run python manage.py create_task --type example --message "Hello from the demo" \
  --delay 10 --port "$PORT" --no-start | sed -n 's/^Created ExampleTask with ID: //p')
poetry run python manage.py start_task ExampleTask "$example" >/dev/null
waiting=$(poetry run python manage.py create_task --type continue --port "$PORT" --no-start \
  | sed -n 's/^Created ContinueTask with ID: //p')
poetry run python manage.py start_task ContinueTask "$waiting" >/dev/null
# A staff user for the live dashboard (demo project only; a fresh password each run).
login=$(poetry run python manage.py demo_user --url "http://127.0.0.1:$PORT/streaming/")
cat <<MSG

Two demo tasks are queued; the server below runs them. In another terminal$path_hint:
  poetry run python stream_client.py ExampleTask $example --port $PORT     # 3 steps, 10 s apart
  poetry run python stream_client.py ContinueTask $waiting --port $PORT    # waits for you:
  poetry run python manage.py shell -c "from streaming.models import ContinueTask; import asyncio; asyncio.run(ContinueTask.objects.filter(pk=$waiting).aupdate(continue_field=True))"
  curl http://127.0.0.1:$PORT/stream/ExampleTask/$example
  open http://127.0.0.1:$PORT/admin/ (as the demo user below, or manage.py createsuperuser)

The live dashboard: http://127.0.0.1:$PORT/ links it; every task, live, with cancel and re-run.
$login

MSG
exec poetry run python manage.py runserver_stream --port "$PORT"
