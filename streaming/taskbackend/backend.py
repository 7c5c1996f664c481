"""StreamingTaskBackend: Django's tasks framework on our runners.

    TASKS = {"default": {"BACKEND": "streaming.taskbackend.StreamingTaskBackend"}}

``enqueue()`` inserts an ``EnqueuedTask`` row (pending); the runners of every
server (and ``manage.py runtasks`` worker) claim it like any task: once,
under a lease, recovered by its policy when its server dies, cancellable.
"""

from typing import Any

from asgiref.sync import sync_to_async
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from ..access import DEFAULT_EXPIRES_IN, stream_token
from ..models import EnqueuedTask, Recovery
from .compat import (
    BaseTaskBackend,
    InvalidTask,
    Task,
    TaskResultDoesNotExist,
    normalize_json,
    task_enqueued,
)
from .results import StreamingTask, StreamingTaskResult, to_result

__all__ = ["StreamingTaskBackend"]

RECOVERIES = {choice.value for choice in Recovery}


class StreamingTaskBackend(BaseTaskBackend):
    """Runs ``@task`` functions on streaming servers, with live progress streams.

    OPTIONS: ``RECOVERY`` ("fail", the default, or "retry": what happens to a
    task whose server died while it ran) and ``MAX_ATTEMPTS`` (3: runs in all
    under "retry"); a task overrides both with ``@task(recovery=..., max_attempts=...)``.
    """

    task_class = StreamingTask
    runs_enqueued_tasks = True  # what makes the runners claim EnqueuedTask rows (EnqueuedTask.runs_here)
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        unknown = set(self.options) - {"RECOVERY", "MAX_ATTEMPTS"}
        if unknown:
            raise ImproperlyConfigured(f"TASKS[{alias!r}]['OPTIONS']: unknown option(s) {sorted(unknown)}")
        self.recovery = _recovery(self.options.get("RECOVERY", Recovery.FAIL), f"TASKS[{alias!r}] RECOVERY")
        self.max_attempts = _max_attempts(
            self.options.get("MAX_ATTEMPTS", 3), f"TASKS[{alias!r}] MAX_ATTEMPTS"
        )

    # -- the framework's contract -------------------------------------------------

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        try:
            _recovery(getattr(task, "recovery", None) or self.recovery, "recovery")
            if getattr(task, "max_attempts", None) is not None:
                _max_attempts(task.max_attempts, "max_attempts")  # type: ignore[attr-defined]
        except ImproperlyConfigured as exc:
            raise InvalidTask(str(exc)) from None

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> StreamingTaskResult:
        row = EnqueuedTask.objects.create(**self._row(task, args, kwargs))
        result = to_result(row, task)
        task_enqueued.send(type(self), task_result=result)
        return result

    async def aenqueue(self, task: Task, args: Any, kwargs: Any) -> StreamingTaskResult:
        row = await EnqueuedTask.objects.acreate(**self._row(task, args, kwargs))
        result = to_result(row, task)
        await task_enqueued.asend(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> StreamingTaskResult:
        return to_result(self._get(result_id))

    async def aget_result(self, result_id: str) -> StreamingTaskResult:
        return await sync_to_async(self.get_result)(result_id)

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        from django.apps import apps

        if apps.is_installed("streaming"):
            return []
        return [
            checks.Error(
                f"TASKS[{self.alias!r}] uses StreamingTaskBackend, but 'streaming' is not in INSTALLED_APPS",
                id="streaming.E001",
            )
        ]

    # -- ours: cancel, streams ---------------------------------------------------

    def cancel(self, result_id: str) -> str:
        """Cancel a task: one not yet started never runs; a running one is stopped by
        its runner (an async function at its next await, a sync one at its next
        ``send_event()``). Ends FAILED, with ``stream_status`` "cancelled" and a
        ``TaskCancelled`` errors entry. Returns our status after asking
        (a finished task stays as it is). Raises TaskResultDoesNotExist."""
        return self._get(result_id).cancel()

    async def acancel(self, result_id: str) -> str:
        return await sync_to_async(self.cancel)(result_id)

    def stream_path(self, result_id: str) -> str:
        return EnqueuedTask(pk=_pk(result_id)).get_stream_path()

    def stream_url(self, result_id: str, *, expires_in: float = DEFAULT_EXPIRES_IN) -> str:
        """The task's stream path with a signed token (``streaming.access.stream_token``),
        valid for ``expires_in`` seconds; no query (it does not check that the task exists)."""
        row = EnqueuedTask(pk=_pk(result_id))
        return f"{row.get_stream_path()}?token={stream_token(row, expires_in=expires_in)}"

    # -- rows ---------------------------------------------------------------------------

    def _row(self, task: Task, args: Any, kwargs: Any) -> dict[str, Any]:
        self.validate_task(task)
        try:
            args, kwargs = normalize_json(list(args)), normalize_json(dict(kwargs))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Task arguments must be JSON: {exc}") from None
        return {
            "task_path": task.module_path,
            "args": args,
            "kwargs": kwargs,
            "backend": self.alias,
            "queue_name": task.queue_name,
            "priority": task.priority,
            "run_after": task.run_after,
            "takes_context": task.takes_context,
            "recovery": getattr(task, "recovery", None) or self.recovery,
            "max_attempts": getattr(task, "max_attempts", None) or self.max_attempts,
        }

    def _get(self, result_id: str) -> EnqueuedTask:
        try:
            return EnqueuedTask.objects.get(pk=_pk(result_id))
        except (EnqueuedTask.DoesNotExist, ValueError):
            raise TaskResultDoesNotExist(result_id) from None


def _pk(result_id: str | int) -> int:
    if isinstance(result_id, bool) or not str(result_id).isdigit():
        raise ValueError(f"Not a result id of this backend: {result_id!r}")
    return int(result_id)


def _recovery(value: object, where: str) -> str:
    if value not in RECOVERIES:
        raise ImproperlyConfigured(f"{where} must be one of {sorted(RECOVERIES)}, not {value!r}")
    return str(value)


def _max_attempts(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100:
        raise ImproperlyConfigured(f"{where} must be a whole number from 1 to 100, not {value!r}")
    return value
