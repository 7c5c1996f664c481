import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from streaming.conf import get_settings
from streaming.node import Node
from streaming.transports import is_shared


class Command(BaseCommand):
    help = (
        "Run tasks without serving HTTP: a worker process beside web servers that serve the "
        "streams (needs a shared broker: STREAMING['BROKER_URL'] = redis://...)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        if not is_shared(get_settings().BROKER_URL):
            raise CommandError(
                "runtasks runs tasks for web servers in other processes, and the in-memory broker "
                "cannot carry their events there: clients would see nothing live. Set "
                "STREAMING['BROKER_URL'] to redis://host:6379/0 (or run manage.py runserver_stream, "
                "which runs tasks and serves their streams in one process)."
            )
        self.stdout.write("Running tasks (no HTTP server). Ctrl+C or SIGTERM stops; a second one at once.")
        self.stdout.flush()
        asyncio.run(run_tasks(Node(run_tasks=True)))


async def run_tasks(node: Node) -> None:
    """Run ``node`` until SIGINT/SIGTERM; stop it as runserver_stream does (a second signal hurries)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            node.hurry()
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await node.start()
        try:
            await stopping.wait()
        finally:
            await node.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
