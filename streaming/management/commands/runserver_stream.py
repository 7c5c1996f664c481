import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from streaming.conf import get_settings
from streaming.server.serve import serve
from streaming.server.supervisor import serve_reloading, serve_workers
from streaming.transports import is_shared


class Command(BaseCommand):
    help = "Run the streaming server: runs tasks and serves /stream/<Model>/<id> as SSE."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
        parser.add_argument("--port", type=int, default=8888, help="port to bind (8888)")
        parser.add_argument("--socket", help="serve on this Unix socket path instead of TCP")
        parser.add_argument(
            "--workers",
            type=int,
            default=1,
            help="processes to run (needs a shared broker: STREAMING['BROKER_URL'] = redis://...)",
        )
        parser.add_argument(
            "--reload",
            action="store_true",
            help="development: restart when a .py file under the current directory (or --reload-dir) changes",
        )
        parser.add_argument(
            "--reload-dir",
            action="append",
            dest="reload_dirs",
            metavar="DIR",
            help="with --reload: watch this directory instead of the current one (repeatable)",
        )
        parser.add_argument(
            "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
        )

    def handle(
        self,
        *args: Any,
        host: str,
        port: int,
        socket: str | None,
        log_level: str,
        workers: int,
        reload: bool,
        reload_dirs: list[str] | None,
        **options: Any,
    ) -> None:
        settings = get_settings()
        shared = is_shared(settings.BROKER_URL)
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        if workers > 1 and not shared:
            raise CommandError(
                f"--workers {workers} needs a broker that processes share: the in-memory broker "
                "keeps each process's events to itself. Set STREAMING['BROKER_URL'] (in the demo "
                "project: the STREAMING_BROKER_URL environment variable) to redis://host:6379/0."
            )
        if not settings.RUN_TASKS and not shared:
            raise CommandError(
                "RUN_TASKS is False, so the tasks run in other processes (manage.py runtasks), and "
                "the in-memory broker cannot carry their events here: clients would get what the "
                "event log held when they connected and then nothing until the task had ended. "
                "Set STREAMING['BROKER_URL'] to redis://host:6379/0, or leave RUN_TASKS True."
            )
        if reload and workers > 1:
            raise CommandError("--reload runs one server process; leave --workers out")
        if reload_dirs and not reload:
            raise CommandError("--reload-dir needs --reload")
        where = f"unix:{socket}" if socket else f"{host}:{port}"
        suffix = f" ({workers} workers)" if workers > 1 else " (reloading on changes)" if reload else ""
        self.stdout.write(f"Starting streaming server on {where}{suffix}")
        self.stdout.flush()
        sys.stdout.flush()
        if reload:
            serve_reloading(host=host, port=port, uds=socket, log_level=log_level, reload_dirs=reload_dirs)
        elif workers > 1:
            serve_workers(workers, host=host, port=port, uds=socket, log_level=log_level)
        else:
            serve(host=host, port=port, uds=socket, log_level=log_level)
