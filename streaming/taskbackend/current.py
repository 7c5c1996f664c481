"""``send_event()`` from inside a ``@task`` function: the run it belongs to, found by a contextvar.

The worker (``worker.py``) sets the contextvar around the function's call; a
sync function runs in a thread of its own, which inherits it, and sends
through the server's event loop. Outside a run (the function called
directly, in a test, or under another backend) both calls do nothing and
return None, so a function that reports progress runs under any backend.
"""

import asyncio
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models import EnqueuedTask

__all__ = ["TaskCancelled", "TaskInterrupted", "asend_event", "is_cancelled", "send_event"]


class TaskCancelled(Exception):
    """Raised by ``send_event()`` in a sync task whose run was cancelled (or
    stopped): the function should let it propagate. Also the ``errors``
    entry of a cancelled task's result."""


class TaskInterrupted(Exception):
    """The ``errors`` entry of an attempt whose server died (or shut down) while it ran."""


@dataclass
class CurrentRun:
    row: "EnqueuedTask"
    loop: asyncio.AbstractEventLoop
    # Set on the loop once the run's await is over (returned, raised, cancelled):
    # a sync function's thread may still be running, and sends nothing more.
    stopped: threading.Event = field(default_factory=threading.Event)

    def in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    async def send(self, event_type: str, data: dict[str, Any] | None) -> int:
        if self.stopped.is_set():
            raise TaskCancelled("The task's run is over; nothing more is sent")
        return await self.row.send_event(event_type, data)


_current: ContextVar[CurrentRun | None] = ContextVar("streaming_current_task_run", default=None)


def send_event(event_type: str, data: dict[str, Any] | None = None) -> int | None:
    """Stream one event of the running task (from a sync ``@task`` function).

    Returns the event's sequence number once it is out, or None outside a
    run of our backend. Raises ``TaskCancelled`` once the task was cancelled:
    a sync function stops there (a thread cannot be interrupted).
    """
    current = _current.get()
    if current is None:
        return None
    if current.in_loop_thread():
        raise RuntimeError("In an async @task function, use `await asend_event(...)`")
    if current.stopped.is_set():
        raise TaskCancelled("The task's run is over; nothing more is sent")
    return asyncio.run_coroutine_threadsafe(current.send(event_type, data), current.loop).result()


async def asend_event(event_type: str, data: dict[str, Any] | None = None) -> int | None:
    """Stream one event of the running task (from an async ``@task`` function).

    Returns the event's sequence number, or None outside a run of our backend.
    """
    current = _current.get()
    if current is None:
        return None
    return await current.send(event_type, data)


def is_cancelled() -> bool:
    """True once the current run was cancelled or stopped (for a sync function's
    long loops between events); False outside a run."""
    current = _current.get()
    return current is not None and current.stopped.is_set()
