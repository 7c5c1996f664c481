"""Run a task to its end inside a test: no server, the runner's own code paths.

    from django.test import TestCase
    from streaming.testing import run_task

    class ReportTests(TestCase):
        def test_report(self):
            result = run_task(Report.objects.create(query="x"))
            self.assertEqual(result.status, "completed")
            self.assertEqual(result.types, ["started", "progress", "complete"])
            self.assertEqual(result.final_value, {"rows": 3})

``run_task`` (sync tests) and ``arun_task`` (async tests) claim the row, run
``process()``, number, encode and end the task exactly as a server's runner
does (the runner's ``TaskRun``, its end and failure handling, its recovery
policy, the event log), and return what every client would have received.

All database work runs on the calling test's connection, so a plain
``django.test.TestCase`` works: the run happens inside the test's
transaction and is rolled back with it. Use ``TransactionTestCase`` (or
pytest-django's ``transaction=True``) when the task's code reaches the
database from a thread of its own, when you test something that needs real
commits (``on_commit``, a server subprocess), or for async tests that do not
run under ``async_to_sync`` (pytest-asyncio): their ORM calls use another
connection, which cannot see the test's uncommitted rows.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from asgiref.sync import async_to_sync, iscoroutinefunction, sync_to_async
from django.db import transaction

from .conf import StreamingSettings, get_settings
from .events import ERROR, RUNNER_KEYS, TERMINAL_TYPES, Event
from .fanout.hub import Hub
from .keys import TaskKey
from .models import FINISHED_STATUSES, Recovery, Status, StreamTask
from .tasks import store
from .tasks.eventlog import EventLog
from .tasks.run import TaskRun
from .tasks.runner import Runner
from .transports.base import History, Transport

__all__ = [
    "DEFAULT_TIMEOUT",
    "OnEvent",
    "RecordedEvent",
    "TaskError",
    "TaskResult",
    "TaskTimeout",
    "arun_task",
    "run_task",
]

DEFAULT_TIMEOUT = 10.0
INTERRUPT_GRACE = 5.0  # seconds a timed-out task gets to end like an interrupted one

T = TypeVar("T", bound=StreamTask)


@dataclass(frozen=True)
class RecordedEvent:
    """One event, as every client receives it: ``id:`` (seq), ``event:`` (type), ``data:`` (JSON)."""

    seq: int
    type: str
    data: dict[str, Any]  # with the runner's _task_id, _model and _timestamp
    sse: bytes = field(repr=False)  # the exact bytes written to every stream

    @property
    def fields(self) -> dict[str, Any]:
        """``data`` without ``_task_id``, ``_model`` and ``_timestamp``: what the task sent."""
        return {k: v for k, v in self.data.items() if k not in RUNNER_KEYS}

    @classmethod
    def _from_event(cls, event: Event) -> "RecordedEvent":
        return cls(event.seq, event.type, json.loads(event.payload), event.sse)


OnEvent = Callable[[RecordedEvent], Awaitable[None] | None]


@dataclass(frozen=True)
class TaskError:
    """How a failed task ended: its ``error`` event's type and message, and the row's traceback."""

    type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True)
class TaskResult(Generic[T]):
    """A finished run: the row's final state and every event, in order."""

    task: T  # the instance passed in, refreshed from the database
    status: str
    final_value: Any
    error: TaskError | None  # set when the task ended with an ``error`` event
    events: list[RecordedEvent]

    @property
    def types(self) -> list[str]:
        return [event.type for event in self.events]

    def of_type(self, event_type: str) -> list[RecordedEvent]:
        return [event for event in self.events if event.type == event_type]

    def __repr__(self) -> str:
        ended = f"{self.status}: {self.error}" if self.error else self.status
        return f"<TaskResult {type(self.task).__name__} {self.task.pk} {ended}; events {self.types}>"


class TaskTimeout(AssertionError):
    """The task did not end within the timeout; ``events`` holds what it sent."""

    def __init__(self, message: str, events: list[RecordedEvent]) -> None:
        super().__init__(message)
        self.events = events


def run_task(task: T, *, timeout: float = DEFAULT_TIMEOUT, on_event: OnEvent | None = None) -> TaskResult[T]:
    """Run a pending task to its end in a sync test; returns its events and final state.

    ``on_event(event)`` (sync or async) is called with each event as the task
    sends it, before the task goes on: steer the task from there (update its
    row, cancel it). Raises ``TaskTimeout`` if it has not ended after
    ``timeout`` seconds.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return async_to_sync(arun_task)(task, timeout=timeout, on_event=on_event)
    raise RuntimeError("run_task() was called where an event loop runs: use `await arun_task(...)`")


async def arun_task(
    task: T, *, timeout: float = DEFAULT_TIMEOUT, on_event: OnEvent | None = None
) -> TaskResult[T]:
    """``run_task()`` for async tests."""
    model = _check_instance(task)
    settings = get_settings()
    eventlog = EventLog(settings.EVENT_FLUSH_INTERVAL, settings.EVENT_BATCH_SIZE)
    transport = _NoTransport()
    hub = _RecordingHub(on_event, transport=transport, history=eventlog, settings=settings)
    runner = Runner(hub=hub, transport=transport, eventlog=eventlog, settings=settings)
    claim = await sync_to_async(_claim)(model, task.pk, runner.owner, settings.LEASE_SECONDS)
    run = TaskRun(runner, claim)
    hub.bind(runner, run)
    runner.runs[run.key] = run
    runner.eventlog.start()
    run.task = asyncio.create_task(runner._execute(run), name=f"streaming-test {run.key}")
    try:
        ended = await _supervise(runner, run, timeout)
        if not ended:
            where = _suspended_at(run.task)
            await _interrupt(runner, run)
            await task.arefresh_from_db()
            raise TaskTimeout(_timeout_message(task, timeout, hub.events, where), hub.events)
    finally:
        if not run.task.done():  # arun_task() itself was cancelled, or the interrupt hung
            runner._stopping = True
            run.task.cancel()
        await runner.eventlog.stop()
        await hub.stop()
    if hub.failure is not None:
        raise hub.failure
    await task.arefresh_from_db()
    if not hub.events or hub.events[-1].type not in TERMINAL_TYPES:
        raise RuntimeError(
            f"{_name(task)} stopped without an end (status {task.status!r}): another runner took it"
        )
    return _result(task, hub.events)


# -- the parts of a run ------------------------------------------------------------


class _RecordingHub(Hub):
    """The run's hub, with no subscribers: keeps what the runner publishes and calls ``on_event``."""

    def __init__(
        self, on_event: OnEvent | None, *, transport: Transport, history: History, settings: StreamingSettings
    ) -> None:
        super().__init__(transport=transport, history=history, settings=settings)
        self.on_event = on_event
        self.events: list[RecordedEvent] = []
        self.failure: Exception | None = None
        self.runner: Runner | None = None
        self.run: TaskRun | None = None

    def bind(self, runner: Runner, run: TaskRun) -> None:
        self.runner, self.run = runner, run

    async def publish(self, key: TaskKey, event: Event) -> None:
        await super().publish(key, event)
        recorded = RecordedEvent._from_event(event)
        self.events.append(recorded)
        runner, run = self.runner, self.run
        if self.on_event is None or self.failure is not None or runner is None or runner._stopping:
            return
        try:
            if iscoroutinefunction(self.on_event):
                await self.on_event(recorded)
            else:
                # On the test's thread, with its database connection.
                await sync_to_async(self.on_event)(recorded)
        except Exception as exc:
            # The test's own failure (an assertion in the callback): stop the
            # task as a server shutdown would, then re-raise it to the test.
            self.failure = exc
            if not event.terminal and run is not None and run.task is not None:
                runner._stopping = True
                run.task.cancel()
            return
        if not event.terminal and run is not None:
            # The callback may have steered the task: its wait_until() looks
            # again now, and a cancel it asked for lands before the next step.
            run.row_changed()
            await runner._check_cancellations()


class _NoTransport(Transport):
    """No other process to reach: a task handed back waits for the next run_task()."""

    def publish(self, key: TaskKey, event: Event) -> None:
        pass

    def wake_all(self) -> None:
        pass

    async def wake(self) -> None:
        pass


def _check_instance(task: object) -> type[StreamTask]:
    if isinstance(task, type) and issubclass(task, StreamTask):
        raise TypeError(
            f"run_task() takes a task row, not the class: run_task({task.__name__}.objects.create(...))"
        )
    if not isinstance(task, StreamTask):
        raise TypeError(f"run_task() takes a StreamTask instance, not {type(task).__name__}")
    if task.pk is None or task._state.adding:
        raise ValueError(
            f"This {type(task).__name__} is not saved: create it with "
            f"{type(task).__name__}.objects.create(...) (or save() it) first"
        )
    if task._meta.proxy:
        concrete = task._meta.concrete_model.__name__ if task._meta.concrete_model else "its model"
        raise TypeError(
            f"{type(task).__name__} is a proxy model: a server runs its row as {concrete}, "
            f"whose process() it calls; run_task() the {concrete} instance"
        )
    return type(task)


def _claim(model: type[StreamTask], pk: Any, owner: str, lease_seconds: float) -> store.Claim:
    """The runner's claim of one row (``store._take``), after telling why a row cannot run."""
    name = f"{model.__name__} {pk}"
    row = model.objects.filter(pk=pk).values_list("status", "lease_owner").first()
    if row is None:
        raise ValueError(
            f"{name} does not exist in the database (deleted, or saved on another connection: an async "
            "test outside django.test.TestCase, e.g. pytest-asyncio, needs a transactional test)"
        )
    status, lease_owner = row
    if status == Status.CREATED:
        raise ValueError(
            f"{name} is 'created' (not started): call task.start() first, as a runner would wait"
        )
    if status in FINISHED_STATUSES:
        raise ValueError(f"{name} has already ended ({status}): a task runs once; create a new one")
    if status == Status.RUNNING:
        raise ValueError(f"{name} is already running (held by {lease_owner})")
    with transaction.atomic():
        claim = store._take(model, pk, owner, lease_seconds)
    if claim is None:
        raise RuntimeError(f"{name} was taken by another runner meanwhile")
    return claim


async def _supervise(runner: Runner, run: TaskRun, timeout: float) -> bool:
    """Wait for the run to end, passing cancel requests on as the runner's loop does.

    False if it is still running after ``timeout`` seconds.
    """
    assert run.task is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not run.task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.wait({run.task}, timeout=min(runner.settings.POLL_INTERVAL, remaining))
        if not run.task.done() and not runner._stopping:
            await runner._check_cancellations()
    return True


async def _interrupt(runner: Runner, run: TaskRun) -> None:
    """Stop the run as a server shutdown does: back to pending or failed, by its recovery policy."""
    assert run.task is not None
    runner._stopping = True
    run.task.cancel()
    await asyncio.wait({run.task}, timeout=INTERRUPT_GRACE)


def _result(task: T, events: list[RecordedEvent]) -> TaskResult[T]:
    last = events[-1]
    error = None
    if last.type == ERROR:
        error = TaskError(str(last.data.get("type", "")), str(last.data.get("message", "")), task.error)
    return TaskResult(task=task, status=task.status, final_value=task.final_value, error=error, events=events)


def _name(task: StreamTask) -> str:
    return f"{type(task).__name__} {task.pk}"


def _timeout_message(task: StreamTask, timeout: float, events: list[RecordedEvent], where: str) -> str:
    sent = [e for e in events if e.type != ERROR or e.fields.get("type") != "Interrupted"]
    last = f"#{sent[-1].seq} {sent[-1].type!r} {sent[-1].fields}" if sent else "none (it sent no event)"
    if task.status == Status.PENDING:
        now = f"handed back to 'pending' (Recovery.RETRY, attempt {task.attempts} of {task.max_attempts})"
    elif task.status == Status.FAILED:
        policy = "Recovery.FAIL" if task.recovery == Recovery.FAIL else "no attempts left"
        now = f"failed with an 'Interrupted' error event ({policy})"
    else:
        now = f"left {task.status!r}: it did not stop when cancelled"
    return (
        f"{_name(task)} did not end within {timeout:g} s. Last event: {last}. "
        f"It was waiting at: {where or 'unknown'}. Stopped as a server shutdown stops a task: {now}."
    )


def _suspended_at(task: asyncio.Task) -> str:
    """Where a task's coroutine chain waits, below the runner: ``module:line in function -> ...``."""
    frames = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:
            break
        frames.append(f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return " -> ".join(frames[1:])  # frames[0] is the runner's own _execute()
