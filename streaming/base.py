"""StreamTask: the abstract model every streamable task subclasses."""

import asyncio
import inspect

from asgiref.sync import sync_to_async
from django.db import models

from .conf import get_settings
from .events import RESERVED_TYPES, validate_event_type


class Status(models.TextChoices):
    CREATED = "created", "created (not started)"
    PENDING = "pending", "pending"
    RUNNING = "running", "running"
    COMPLETED = "completed", "completed"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


FINISHED_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class Recovery(models.TextChoices):
    """What happens to a task whose server died while it ran."""

    RETRY = "retry", "run process() again from the start"
    FAIL = "fail", "end the task with an error event"


class StreamTask(models.Model):
    """A task is a row: create one and a streaming server runs its process().

    Subclasses implement ``async def process(self)``, call
    ``await self.send_event(type, data)`` as they go, and return the final
    value (stored in ``final_value`` and sent with the ``complete`` event).
    """

    # Class-level options; override them on a subclass.
    persist_events = True  # False: only the terminal event reaches the event log
    recovery = Recovery.FAIL  # process() may have side effects: never repeat it silently
    max_attempts = 3  # with Recovery.RETRY: runs at most this often in all

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    final_value = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    lease_owner = models.CharField(max_length=200, null=True, blank=True, db_index=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Event sequence numbers below this are handed out already: a task taken
    # up again after a crash numbers its events above anything a client saw.
    seq_reserved = models.BigIntegerField(default=0)

    class Meta:
        abstract = True

    async def process(self):
        raise NotImplementedError(f"{type(self).__name__} must implement async def process(self)")

    # -- inside process() ---------------------------------------------------

    async def send_event(self, event_type: str, data: dict | None = None) -> int:
        """Send one event to every watcher; returns its sequence number."""
        validate_event_type(event_type)
        if event_type in RESERVED_TYPES:
            raise ValueError(
                f"'{event_type}' is sent by the runner: return from process() to complete, raise to fail"
            )
        return (await self._current_run().send(event_type, data)).seq

    async def send_events_from(self, source, event_type: str = "progress") -> int:
        """Send each item of an async or sync iterable (dicts) as one event.

        A sync generator runs in a worker thread, one item at a time, so a
        blocking producer never stalls the server. Returns the count sent.
        """
        count = 0
        if hasattr(source, "__aiter__"):
            async for item in source:
                await self.send_event(event_type, item)
                count += 1
            return count
        iterator = iter(source)
        done = object()
        next_item = sync_to_async(next)  # the ORM thread: a generator may query
        while (item := await next_item(iterator, done)) is not done:
            await self.send_event(event_type, item)
            count += 1
        return count

    async def wait_until(self, predicate, *, fields=None, poll_interval=None, timeout=None):
        """Wait until ``predicate(self)`` is true, re-reading the row meanwhile.

        Re-reads ``fields`` (all fields if None) every ``poll_interval``
        seconds (STREAMING["WAIT_POLL_INTERVAL"] by default), and at once when
        this process saves the row. Raises TimeoutError after ``timeout``
        seconds (None: wait as long as it takes).
        """
        interval = poll_interval or get_settings().WAIT_POLL_INTERVAL
        run = getattr(self, "_stream_run", None)
        async with asyncio.timeout(timeout):
            while True:
                await self.arefresh_from_db(fields=fields)
                result = predicate(self)
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                if run is not None:
                    await run.wait_for_row_change(interval)
                else:
                    await asyncio.sleep(interval)

    def _current_run(self):
        run = getattr(self, "_stream_run", None)
        if run is None:
            raise RuntimeError(
                f"{type(self).__name__}.send_event() works only while a streaming server "
                "runs the task (manage.py runserver_stream, or a streaming.node.Node in tests)"
            )
        return run

    # -- control, from anywhere --------------------------------------------

    def start(self):
        """Queue a task created with status 'created' (create_task --no-start)."""
        from . import store

        return store.start_task(self)

    async def astart(self):
        return await sync_to_async(self.start)()

    def cancel(self):
        """Cancel: a pending task ends at once, a running one is stopped by its runner."""
        from . import store

        return store.cancel_task(self)

    async def acancel(self):
        return await sync_to_async(self.cancel)()

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @classmethod
    def stream_name(cls) -> str:
        return cls.__name__

    def get_stream_path(self) -> str:
        return f"/stream/{self.stream_name()}/{self.pk}"

    def __str__(self):
        return f"{type(self).__name__} {self.pk} ({self.status})"
