"""The framework's objects built from our rows: the task class, the result, the status mapping."""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from .compat import Task, TaskError, TaskResult, TaskResultStatus, set_frozen
from .current import TaskCancelled, TaskInterrupted

if TYPE_CHECKING:
    from ..models import EnqueuedTask

__all__ = ["STATUSES", "StreamingTask", "StreamingTaskResult", "load_task", "to_result"]

# Our six statuses onto the framework's four. A cancelled task and one whose
# server died (failed by its policy) are FAILED, with an errors entry naming
# TaskCancelled / TaskInterrupted; the status itself stays in stream_status.
STATUSES = {
    "created": TaskResultStatus.READY,
    "pending": TaskResultStatus.READY,  # also a task handed back for a retry
    "running": TaskResultStatus.RUNNING,
    "completed": TaskResultStatus.SUCCESSFUL,
    "failed": TaskResultStatus.FAILED,
    "cancelled": TaskResultStatus.FAILED,
}
CANCELLED_PATH = f"{TaskCancelled.__module__}.{TaskCancelled.__qualname__}"
INTERRUPTED_PATH = f"{TaskInterrupted.__module__}.{TaskInterrupted.__qualname__}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamingTask(Task):
    """The framework's Task, with our crash-recovery policy per task:
    ``@task(recovery="retry", max_attempts=5)``. None: the backend's OPTIONS
    (``RECOVERY``, ``MAX_ATTEMPTS``)."""

    recovery: str | None = None  # "fail" or "retry" (streaming.Recovery)
    max_attempts: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamingTaskResult(TaskResult):  # type: ignore[misc]  # the stubs' TaskResult is unfrozen; it is not
    """The framework's TaskResult, plus the stream and cancellation.

    ``stream_status`` is our own status (created, pending, running,
    completed, failed, cancelled), of which ``status`` is the framework's view.
    """

    stream_status: str = ""

    def _backend(self) -> Any:  # our StreamingTaskBackend (backend.py imports this module)
        return self.task.get_backend()

    @property
    def stream_path(self) -> str:
        """``/stream/EnqueuedTask/<id>``: opens only with a token, a user allowed to view it, or neither."""
        return str(self._backend().stream_path(self.id))

    def stream_url(self, *, expires_in: float = 300) -> str:
        """The stream's path with a signed token valid for ``expires_in`` seconds,
        for a browser's ``new EventSource(url)``."""
        return str(self._backend().stream_url(self.id, expires_in=expires_in))

    def cancel(self) -> str:
        """Ask for this task to be cancelled (see ``StreamingTaskBackend.cancel``); refreshes the result."""
        status: str = self._backend().cancel(self.id)
        self.refresh()
        return status

    async def acancel(self) -> str:
        status: str = await self._backend().acancel(self.id)
        await self.arefresh()
        return status

    def refresh(self) -> None:
        self._refresh_from(self._backend().get_result(self.id))

    async def arefresh(self) -> None:
        self._refresh_from(await self._backend().aget_result(self.id))

    def _refresh_from(self, fresh: "StreamingTaskResult") -> None:
        for field in dataclasses.fields(self):
            if field.name not in ("task", "id", "args", "kwargs", "backend"):
                set_frozen(self, field.name, getattr(fresh, field.name))


def load_task(row: "EnqueuedTask") -> Task:
    """The ``@task`` object the row names, with the row's priority, queue, run_after and backend."""
    try:
        found = import_string(row.task_path)
    except ImportError as exc:
        raise ValueError(f"Task {row.task_path!r} cannot be imported (moved or renamed?): {exc}") from None
    if not isinstance(found, Task):
        raise ValueError(f"{row.task_path!r} is not a task (a function decorated with @task)")
    return dataclasses.replace(
        found, priority=row.priority, queue_name=row.queue_name, run_after=row.run_after, backend=row.backend
    )


def errors_of(row: "EnqueuedTask") -> list[TaskError]:
    """What each attempt raised: the function's exceptions as recorded, an attempt
    that left none and was not the last (its server died) as TaskInterrupted, and
    the last attempt's end when the function raised nothing (cancelled, interrupted)."""
    by_attempt = {entry["attempt"]: entry for entry in row.errors}
    last = row.attempts if row.status != "pending" else row.attempts + 1  # pending: the next is to come
    errors: list[TaskError] = []
    for attempt in range(1, row.attempts + 1):
        entry = by_attempt.get(attempt)
        if entry is not None:
            errors.append(
                TaskError(exception_class_path=entry["exception_class_path"], traceback=entry["traceback"])
            )
        elif attempt < last:
            errors.append(TaskError(exception_class_path=INTERRUPTED_PATH, traceback="Task interrupted"))
        elif row.status == "cancelled":
            errors.append(
                TaskError(exception_class_path=CANCELLED_PATH, traceback=row.error or "Task cancelled")
            )
        elif row.status == "failed":
            errors.append(TaskError(exception_class_path=INTERRUPTED_PATH, traceback=row.error))
    if row.status == "cancelled" and row.attempts == 0:  # cancelled before any runner took it up
        errors.append(TaskError(exception_class_path=CANCELLED_PATH, traceback="Task cancelled"))
    return errors


def to_result(row: "EnqueuedTask", task: Task | None = None, **changes: Any) -> StreamingTaskResult:
    """The result of ``row`` (its task loaded from ``task_path`` unless given);
    ``changes`` override fields (the worker's view while the row is being written)."""
    values: dict[str, Any] = {
        "task": task or load_task(row),
        "id": str(row.pk),
        "status": STATUSES[row.status],
        "enqueued_at": row.created_at,
        "started_at": row.first_started_at,
        "finished_at": row.completed_at,
        "last_attempted_at": row.started_at,
        "args": row.args,
        "kwargs": row.kwargs,
        "backend": row.backend,
        "errors": errors_of(row),
        "worker_ids": list(row.worker_ids),
        "stream_status": row.status,
        **changes,
    }
    result = StreamingTaskResult(**values)
    if row.status == "completed":
        set_frozen(result, "_return_value", row.final_value)
    return result
