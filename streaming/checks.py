"""Django system checks: configurations that would fail quietly at run time."""

import os
import shlex
import sys
from typing import Any

from django.core import checks

# ASGI/WSGI servers that run several worker processes of one app.
MULTI_PROCESS_SERVERS = ("uvicorn", "gunicorn", "hypercorn", "granian")
# Our own commands: their processes are one (runserver_stream checks its own --workers).
OWN_COMMANDS = ("runserver_stream", "runtasks")


def register() -> None:
    checks.register(check_task_models, checks.Tags.models)
    checks.register(check_topology)
    checks.register(check_metrics)


def check_metrics(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """METRICS on needs prometheus-client (an optional extra)."""
    import importlib.util

    from .conf import get_settings

    if not get_settings().METRICS or importlib.util.find_spec("prometheus_client") is not None:
        return []
    return [
        checks.Warning(
            "STREAMING['METRICS'] is on, but prometheus-client is not installed: /metrics answers 503.",
            hint="pip install 'django-streaming-coordinator[metrics]', or turn METRICS off.",
            id="streaming.W004",
        )
    ]


def check_task_models(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Task model names must be unique, or ``/stream/<Model>/<id>`` is ambiguous."""
    from .tasks.registry import stream_models

    seen: dict[str, list[str]] = {}
    for model in stream_models():
        seen.setdefault(model.__name__, []).append(model._meta.label)
    return [
        checks.Info(
            f"Task models {', '.join(labels)} share the name {name!r}: /stream/{name}/<id> is "
            "ambiguous (404 with a message); clients must use /stream/<app_label>/<Model>/<id>.",
            id="streaming.I001",
        )
        for name, labels in seen.items()
        if len(labels) > 1
    ]


def check_topology(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Processes that cannot see each other, and a server that runs no task at all."""
    from .conf import get_settings
    from .tasks.registry import stream_models
    from .transports import is_shared

    settings = get_settings()
    messages: list[checks.CheckMessage] = []
    shared = is_shared(settings.BROKER_URL)
    reason = several_processes()
    if reason and not shared:
        messages.append(
            checks.Warning(
                f"This project looks served by several processes ({reason}), but the streaming "
                "broker is in memory: each process sees only the events of the tasks it runs, so "
                "a client whose request lands on another process waits for ever.",
                hint="Use Redis: STREAMING['BROKER_URL'] = 'redis://host:6379/0'; or serve with one "
                "process (manage.py runserver_stream serves many clients from one).",
                id="streaming.W001",
            )
        )
    if not settings.RUN_TASKS and not shared:
        messages.append(
            checks.Warning(
                "STREAMING['RUN_TASKS'] is False with the in-memory broker: the tasks run in other "
                "processes (manage.py runtasks), whose live events cannot reach this one.",
                hint="Use Redis: STREAMING['BROKER_URL'] = 'redis://host:6379/0'; or leave RUN_TASKS True.",
                id="streaming.W002",
            )
        )
    if _wsgi_runserver() and stream_models():
        messages.append(
            checks.Warning(
                "manage.py runserver is Django's WSGI development server: it runs no streaming "
                "task (they stay pending) and serves no /stream/ endpoint.",
                hint="Run manage.py runserver_stream instead: it serves your Django views too, runs "
                "the tasks and serves their streams (add --reload to restart on code changes).",
                id="streaming.W003",
            )
        )
    return messages


def several_processes(argv: list[str] | None = None, environ: Any = None) -> str | None:
    """Why this process looks like one of several workers of an ASGI/WSGI server (None: no sign).

    Signs: ``--workers N`` / ``-w N`` on the command line of uvicorn, gunicorn,
    hypercorn or granian (their worker processes keep it: forked, or spawned
    with the parent's ``sys.argv``), gunicorn's ``GUNICORN_CMD_ARGS``, and
    ``WEB_CONCURRENCY`` (the default worker count of uvicorn and gunicorn).
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    if argv[1:2] and argv[1] in OWN_COMMANDS:
        return None
    program = argv[0] if argv else ""
    server = next((name for name in MULTI_PROCESS_SERVERS if name in os.path.basename(program)), None)
    server = server or next((name for name in MULTI_PROCESS_SERVERS if f"/{name}/" in program), None)
    if environ.get("SERVER_SOFTWARE", "").startswith("gunicorn"):  # set in gunicorn's processes
        server = "gunicorn"
    if server:
        workers = _workers_option(argv[1:])
        if workers is None and server == "gunicorn":
            workers = _workers_option(shlex.split(environ.get("GUNICORN_CMD_ARGS", "")))
        if workers is not None:
            return f"{server} --workers {workers}" if workers > 1 else None
    concurrency = environ.get("WEB_CONCURRENCY", "").strip()
    if concurrency.isdigit() and int(concurrency) > 1:
        return f"WEB_CONCURRENCY={concurrency}: uvicorn and gunicorn start that many worker processes"
    return None


def _workers_option(args: list[str]) -> int | None:
    """The value of ``--workers N``, ``--workers=N``, ``-w N`` or ``-wN`` in ``args`` (the last one)."""
    found = None
    for i, arg in enumerate(args):
        value = None
        if arg in ("--workers", "-w") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--workers="):
            value = arg.partition("=")[2]
        elif arg.startswith("-w") and arg[2:].isdigit():
            value = arg[2:]
        if value is not None and value.isdigit():
            found = int(value)
    return found


def _wsgi_runserver() -> bool:
    """True in ``manage.py runserver`` when it is Django's WSGI one (daphne's and
    Channels' runserver serve ASGI, where the first request starts the node)."""
    if sys.argv[1:2] != ["runserver"]:
        return False
    from django.core.management import get_commands

    return get_commands().get("runserver") in ("django.core", "django.contrib.staticfiles")
