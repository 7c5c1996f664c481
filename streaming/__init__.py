"""Run long async Django tasks in the background and stream their events as SSE.

The public API, importable from ``streaming`` itself::

    from streaming import StreamTask, Recovery, Status

Names resolve lazily: this package is imported before Django's app registry
is ready (``INSTALLED_APPS = ["streaming"]``), and models cannot be.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"

if TYPE_CHECKING:
    from .models import FINISHED_STATUSES, Recovery, Status, StreamTask, TaskEvent
    from .tasks.run import LeaseLost

__all__ = ["FINISHED_STATUSES", "LeaseLost", "Recovery", "Status", "StreamTask", "TaskEvent", "__version__"]

_LAZY = {
    **{
        name: "streaming.models"
        for name in ("FINISHED_STATUSES", "Recovery", "Status", "StreamTask", "TaskEvent")
    },
    "LeaseLost": "streaming.tasks.run",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streaming' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
