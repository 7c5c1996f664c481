"""A node: one server process's event log writer, broker and runner, together.

The ASGI app starts one node in its lifespan. Code elsewhere in the process
(signals, model methods) reaches it through the functions at the bottom.
"""

import asyncio
import logging

from django.db import DatabaseError, connection

from .broker import create_broker, is_shared
from .conf import get_settings
from .eventlog import EventLog
from .runner import Runner

logger = logging.getLogger(__name__)

_current: "Node | None" = None


class Node:
    def __init__(self, settings=None, *, run_tasks: bool | None = None):
        self.settings = settings or get_settings()
        self.eventlog = EventLog(self.settings.EVENT_FLUSH_INTERVAL, self.settings.EVENT_BATCH_SIZE)
        self.broker = create_broker(self.settings.BROKER_URL, history=self.eventlog, settings=self.settings)
        run = self.settings.RUN_TASKS if run_tasks is None else run_tasks
        self.runner = (
            Runner(broker=self.broker, eventlog=self.eventlog, settings=self.settings) if run else None
        )
        self._stopped: asyncio.Future | None = None

    async def start(self) -> None:
        global _current
        await self.broker.start()
        self.eventlog.start()
        if self.runner:
            self.runner.start()
        _current = self
        logger.info("Streaming node started (%s)", self.runner.owner if self.runner else "streams only")

    async def stop(self) -> None:
        """Stop once: interrupt tasks, write the log, end every stream."""
        if self._stopped is not None:
            return await self._stopped
        self._stopped = asyncio.get_running_loop().create_future()
        global _current
        try:
            if self.runner:
                await self.runner.stop(self.settings.SHUTDOWN_GRACE)
            await self.eventlog.stop()
            self.broker.close_subscriptions()
            await self.broker.stop()
        finally:
            if _current is self:
                _current = None
            self._stopped.set_result(None)

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()


def current_node() -> Node | None:
    return _current


def wake_runners() -> None:
    """Thread-safe: tell runners to look for work now.

    In a server process the broker does it (Redis: every node). In any other
    process (create_task, shell): with Redis, a one-off publish; on
    PostgreSQL without Redis, a NOTIFY the servers LISTEN for; on SQLite the
    server notices the commit by itself (PRAGMA data_version).
    """
    node = _current
    if node is not None:
        node.broker.wake_runners()
        return
    url = get_settings().BROKER_URL
    if is_shared(url):
        import redis

        from .broker.redis import WAKE_CHANNEL

        try:
            with redis.Redis.from_url(url, socket_timeout=2) as client:
                client.publish(WAKE_CHANNEL, b"1")
        except redis.RedisError as exc:
            logger.warning("Could not wake the runners through Redis (%s); they poll", exc)
    elif connection.vendor == "postgresql":
        from .store import notify_wake

        try:
            notify_wake()
        except DatabaseError as exc:
            logger.warning("Could not wake the runners through PostgreSQL (%s); they poll", exc)


def notify_row_changed(key: str) -> None:
    """Thread-safe: a task row was saved in this process (wakes its wait_until)."""
    node = _current
    if node is not None and node.runner is not None:
        node.runner.row_changed_threadsafe(key)
