"""Running one enqueued ``@task`` function: ``EnqueuedTask.process()`` and ``on_end()`` call here.

An async function runs on the server's loop like any task's ``process()``.
A sync one runs in a daemon thread of its own, so it never blocks the loop
and never holds up a server's exit; it is told of a cancel at its next
``send_event()`` (which raises ``TaskCancelled``) or ``is_cancelled()``.
"""

import asyncio
import contextvars
import logging
import threading
import traceback
from collections.abc import Callable
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.db import connections
from django.utils import timezone

from .compat import Task, TaskContext, TaskResult, normalize_json, task_finished, task_started
from .current import CurrentRun, _current
from .results import load_task, to_result

if TYPE_CHECKING:
    from ..models import EnqueuedTask

RUNNING = "running"
logger = logging.getLogger(__name__)


async def execute(row: "EnqueuedTask") -> Any:
    """One attempt: note its worker, send ``task_started``, call the function, return its value."""
    owner = row.lease_owner
    current = CurrentRun(row, asyncio.get_running_loop())
    token = _current.set(current)
    try:
        task, result = await sync_to_async(_started)(row)  # one trip to the ORM thread, not three
        args = [TaskContext(task_result=result), *row.args] if row.takes_context else list(row.args)
        if iscoroutinefunction(task.func):
            value = await task.func(*args, **row.kwargs)
        else:
            value = await _in_thread(task.func, args, row.kwargs)
        return normalize_json(value)
    except Exception as exc:
        path = f"{type(exc).__module__}.{type(exc).__qualname__}"
        trace = "".join(traceback.format_exception(exc))
        row.errors = [
            *row.errors,
            {"attempt": row.attempts, "exception_class_path": path, "traceback": trace},
        ]
        try:
            await (
                type(row)
                .objects.filter(pk=row.pk, lease_owner=owner, status=RUNNING)
                .aupdate(errors=row.errors)
            )
        except Exception:  # the task fails all the same; its own error is the one to report
            logger.exception("Recording the error of %s %s failed", type(row).__name__, row.pk)
        raise
    finally:
        current.stopped.set()
        _current.reset(token)


def _started(row: "EnqueuedTask") -> tuple[Task, TaskResult]:
    """On the ORM thread: this attempt's worker id on the row, the task, ``task_started``.
    A task that cannot be loaded (its module moved) raises here: the task fails with that error."""
    row.worker_ids = [*row.worker_ids, row.lease_owner]
    row.first_started_at = row.first_started_at or row.started_at or timezone.now()
    type(row).objects.filter(pk=row.pk, lease_owner=row.lease_owner, status=RUNNING).update(
        worker_ids=row.worker_ids, first_started_at=row.first_started_at
    )
    task = load_task(row)
    result = to_result(row, task)
    task_started.send(sender=type(task.get_backend()), task_result=result)
    return task, result


async def _in_thread(func: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` in a daemon thread that carries this context (the current run)."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if outcome.done():  # the run was cancelled meanwhile
            return
        if error is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(value)

    def call() -> None:
        try:
            value = context.run(func, *args, **kwargs)
        except BaseException as error:  # handed to the loop, which re-raises it there
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, value, None)
        finally:
            connections.close_all()  # this thread's own connections end with it

    threading.Thread(target=call, name=f"streaming-task-{func.__name__}", daemon=True).start()
    return await outcome


async def ended(row: "EnqueuedTask") -> None:
    """The run's end is written: ``task_finished``, with the result as stored.

    A read and the receivers only: on a thread of the default executor, off the
    one ORM thread where every claim, renewal and end of this node queues."""
    await sync_to_async(_finished, thread_sensitive=False)(row)


def _finished(row: "EnqueuedTask") -> None:
    fresh = type(row).objects.get(pk=row.pk)
    task = load_task(fresh)
    task_finished.send(sender=type(task.get_backend()), task_result=to_result(fresh, task))
