"""Waking the runners: one concept, in one place.

A runner looks at the database every POLL_INTERVAL; it looks at once when
told that rows changed (a task created, started, cancelled or handed back):

- in a process that runs a node (the server), ``wake_runners()`` goes to the
  node's transport, which wakes this process's runner and, with a shared
  transport (Redis), every other node's;
- in any other process (``create_task``, ``manage.py shell``, a WSGI view):
  with Redis, a one-off publish; on PostgreSQL without Redis, ``NOTIFY``,
  which every runner ``LISTEN``s for (``watch_database``); on SQLite, nothing
  to send: every runner watches ``PRAGMA data_version``, which changes on any
  other connection's commit.

``row_changed(key)`` is the narrower signal a task's own ``wait_until()``
waits for: its row was saved in this process.
"""

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable
from typing import Protocol

from django.db import DatabaseError, connection

from .. import transports
from ..conf import get_settings
from ..keys import TaskKey

logger = logging.getLogger(__name__)

# PostgreSQL without Redis: a saved pending row NOTIFYs this channel.
PG_WAKE_CHANNEL = "streaming_wake"
SQLITE_WATCH_INTERVAL = 0.02


class LocalHooks(Protocol):
    """What the node of this process offers; both methods are thread-safe."""

    def wake_all(self) -> None: ...

    def row_changed(self, key: TaskKey) -> None: ...


_local: LocalHooks | None = None


def install(hooks: LocalHooks) -> None:
    global _local
    _local = hooks


def uninstall(hooks: LocalHooks) -> None:
    global _local
    if _local is hooks:
        _local = None


def wake_runners() -> None:
    """Thread-safe, from any process: runners look for work now (call after commit)."""
    local = _local
    if local is not None:
        local.wake_all()
        return
    url = get_settings().BROKER_URL
    if transports.is_shared(url):
        transports.wake_from_outside(url)
    elif connection.vendor == "postgresql":
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"NOTIFY {PG_WAKE_CHANNEL}")
        except DatabaseError as exc:
            logger.warning("Could not wake the runners through PostgreSQL (%s); they poll", exc)


def row_changed(key: TaskKey) -> None:
    """Thread-safe: a task row was saved in this process (wakes its wait_until)."""
    local = _local
    if local is not None:
        local.row_changed(key)


async def watch_database(wake: Callable[[], None], *, shared_transport: bool) -> None:
    """Call ``wake`` when another process commits work to the database, until cancelled.

    SQLite: ``PRAGMA data_version``. PostgreSQL without a shared transport:
    ``LISTEN``. (With a shared transport, wake-ups travel through it.)
    """
    if connection.vendor == "sqlite":
        await _watch_sqlite(connection.settings_dict["NAME"], wake)
    elif connection.vendor == "postgresql" and not shared_transport:
        await _listen_postgres(wake)


async def _watch_sqlite(path: str | os.PathLike[str], wake: Callable[[], None]) -> None:
    """``PRAGMA data_version`` changes whenever another connection commits;
    reading it costs microseconds, so a 20 ms look replaces a query per model
    per poll as the way rows written by other processes are noticed."""
    watcher = sqlite3.connect(path, timeout=0, check_same_thread=False)
    try:
        version = None
        while True:
            try:
                current = watcher.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.OperationalError:
                current = version  # busy for a moment: look again next time
            if version is not None and current != version:
                wake()
            version = current
            await asyncio.sleep(SQLITE_WATCH_INTERVAL)
    finally:
        watcher.close()


async def _listen_postgres(wake: Callable[[], None]) -> None:
    import psycopg
    from psycopg.conninfo import make_conninfo

    db = connection.settings_dict
    given = {"dbname": "NAME", "user": "USER", "password": "PASSWORD", "host": "HOST", "port": "PORT"}
    conninfo = make_conninfo(**{key: str(db[name]) for key, name in given.items() if db.get(name)})
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listener:
                await listener.execute(f"LISTEN {PG_WAKE_CHANNEL}")
                wake()  # whatever was saved while nobody listened
                async for _notice in listener.notifies():
                    wake()
        except (psycopg.Error, OSError) as exc:
            logger.warning("PostgreSQL wake-up listener lost (%s); polling meanwhile, retrying", exc)
            await asyncio.sleep(1)
