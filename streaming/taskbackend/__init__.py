"""Django's tasks framework (``django.tasks``, or the django-tasks backport on Django 5.2) on our runners.

    TASKS = {"default": {"BACKEND": "streaming.taskbackend.StreamingTaskBackend"}}

Inside a ``@task`` function::

    from streaming.taskbackend import send_event    # sync functions
    from streaming.taskbackend import asend_event   # async functions

Names resolve lazily: ``send_event`` needs neither the framework nor the models.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import StreamingTaskBackend
    from .current import TaskCancelled, TaskInterrupted, asend_event, is_cancelled, send_event
    from .results import STATUSES, StreamingTask, StreamingTaskResult

__all__ = [
    "STATUSES",
    "StreamingTask",
    "StreamingTaskBackend",
    "StreamingTaskResult",
    "TaskCancelled",
    "TaskInterrupted",
    "asend_event",
    "is_cancelled",
    "send_event",
]

_LAZY = {
    "StreamingTaskBackend": "streaming.taskbackend.backend",
    **{
        name: "streaming.taskbackend.current"
        for name in ("TaskCancelled", "TaskInterrupted", "asend_event", "is_cancelled", "send_event")
    },
    **{
        name: "streaming.taskbackend.results" for name in ("STATUSES", "StreamingTask", "StreamingTaskResult")
    },
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streaming.taskbackend' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
