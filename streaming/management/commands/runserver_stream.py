import sys

from django.core.management.base import BaseCommand, CommandError

from streaming.conf import get_settings
from streaming.server.serve import serve
from streaming.server.supervisor import serve_workers
from streaming.transports import is_shared


class Command(BaseCommand):
    help = "Run the streaming server: runs tasks and serves /stream/<Model>/<id> as SSE."

    def add_arguments(self, parser):
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
            "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
        )

    def handle(self, *args, host, port, socket, log_level, workers, **options):
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        if workers > 1 and not is_shared(get_settings().BROKER_URL):
            raise CommandError(
                f"--workers {workers} needs a broker that processes share: the in-memory broker "
                "keeps each process's events to itself. Set STREAMING['BROKER_URL'] (in the demo "
                "project: the STREAMING_BROKER_URL environment variable) to redis://host:6379/0."
            )
        where = f"unix:{socket}" if socket else f"{host}:{port}"
        suffix = f" ({workers} workers)" if workers > 1 else ""
        self.stdout.write(f"Starting streaming server on {where}{suffix}")
        self.stdout.flush()
        sys.stdout.flush()
        if workers > 1:
            serve_workers(workers, host=host, port=port, uds=socket, log_level=log_level)
        else:
            serve(host=host, port=port, uds=socket, log_level=log_level)
