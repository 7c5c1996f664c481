"""Django system checks: configurations that would fail quietly at run time."""

from typing import Any

from django.core import checks


def register() -> None:
    checks.register(check_task_models, checks.Tags.models)


def check_task_models(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Task model names must be unique, or ``/stream/<Model>/<id>`` is ambiguous."""
    from .tasks.registry import stream_models

    seen: dict[str, list[str]] = {}
    for model in stream_models():
        seen.setdefault(model.__name__, []).append(model._meta.label)
    return [
        checks.Info(
            f"Task models {', '.join(labels)} share the name {name!r}: /stream/{name}/<id> is "
            "ambiguous (404 with a message); clients must use /stream/<app_label>/<Model>/<id>.",
            id="streaming.I001",
        )
        for name, labels in seen.items()
        if len(labels) > 1
    ]
