"""A node: one server process's parts, built and started together (the composition root).

    event log writer  <- runner -> hub <-> transport (in-process, or Redis)

The ASGI app starts one node (runserver_stream and runtasks start it
themselves; other servers through the ASGI lifespan, daphne with the first
request). Code elsewhere in the process (signals, model methods) reaches it
only through ``tasks.wake``.
"""

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.apps import apps
from django.db import connection

from .conf import StreamingSettings, get_settings
from .fanout.hub import Hub, RunningTask
from .fanout.mux import MAX_FEED_START
from .keys import TaskKey
from .tasks import store, wake
from .tasks.eventlog import EventLog
from .tasks.runner import Runner
from .transports import create_transport

logger = logging.getLogger(__name__)

_current: "Node | None" = None


class Node:
    def __init__(self, settings: StreamingSettings | None = None, *, run_tasks: bool | None = None):
        self.settings = settings or get_settings()
        self.eventlog = EventLog(self.settings.EVENT_FLUSH_INTERVAL, self.settings.EVENT_BATCH_SIZE)
        self.transport = create_transport(self.settings.BROKER_URL, self.settings)
        self.hub = Hub(
            transport=self.transport,
            history=self.transport.history(self.eventlog),
            settings=self.settings,
            running=_running_tasks,
        )
        run = self.settings.RUN_TASKS if run_tasks is None else run_tasks
        self.runner = (
            Runner(hub=self.hub, transport=self.transport, eventlog=self.eventlog, settings=self.settings)
            if run
            else None
        )
        self.transport.bind(self.hub, on_wake=self._wake_local_runner)
        self._stopped: asyncio.Future[None] | None = None

    async def readiness(self) -> str | None:
        """None when this node can serve and run tasks now; else what it cannot reach.

        One trip through the ORM's thread (where every query of the node
        queues: a stuck database shows here as a timeout) and, with Redis,
        one PING; at most READY_TIMEOUT seconds each."""
        timeout = self.settings.READY_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                await sync_to_async(_ping_database)()
        except TimeoutError:
            return f"database: no answer within {timeout:g} s"
        except Exception as exc:
            return f"database: {type(exc).__name__}"
        try:
            async with asyncio.timeout(timeout):
                await self.transport.check()
        except TimeoutError:
            return f"broker: no answer within {timeout:g} s"
        except Exception as exc:
            return f"broker: {type(exc).__name__}"
        return None

    async def start(self) -> None:
        global _current
        await self.transport.start()
        self.eventlog.start()
        if self.runner:
            self.runner.start()
        _current = self
        wake.install(self)
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
            self.hub.close_subscriptions()
            await self.hub.stop()
            await self.transport.stop()
        finally:
            wake.uninstall(self)
            if _current is self:
                _current = None
            self._stopped.set_result(None)
            logger.info("Streaming node stopped")

    def hurry(self) -> None:
        """A second stop signal: end the shutdown grace now (tasks are interrupted by their policy)."""
        if self.runner is not None:
            self.runner.hurry()

    async def __aenter__(self) -> "Node":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- wake.LocalHooks (thread-safe) ---------------------------------------------

    def wake_all(self) -> None:
        self.transport.wake_all()

    def row_changed(self, key: TaskKey) -> None:
        if self.runner is not None:
            self.runner.row_changed_threadsafe(key)

    def _wake_local_runner(self) -> None:
        if self.runner is not None:
            self.runner.wake_threadsafe()


async def _running_tasks(label: str) -> list[RunningTask]:
    """The running tasks of the model ``label`` names (the hub's feeds re-read them)."""
    return await sync_to_async(store.running_tasks)(apps.get_model(label), MAX_FEED_START)


def current_node() -> Node | None:
    return _current


def _ping_database() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        connection.close()  # broken (reset, ended by the server): the next check reconnects
        raise
