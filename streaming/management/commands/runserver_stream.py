import sys

from django.core.management.base import BaseCommand

from streaming.server import serve


class Command(BaseCommand):
    help = "Run the streaming server: runs tasks and serves /stream/<Model>/<id> as SSE."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
        parser.add_argument("--port", type=int, default=8888, help="port to bind (8888)")
        parser.add_argument("--socket", help="serve on this Unix socket path instead of TCP")
        parser.add_argument(
            "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
        )

    def handle(self, *args, host, port, socket, log_level, **options):
        where = f"unix:{socket}" if socket else f"{host}:{port}"
        self.stdout.write(f"Starting streaming server on {where}")
        self.stdout.flush()
        sys.stdout.flush()
        serve(host=host, port=port, uds=socket, log_level=log_level)
