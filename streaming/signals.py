"""Model signals, connected per task model (apps.py): wake the runners, drop a task's events.

Connected with a sender, never for every model: a ``post_delete`` receiver
without one would turn off Django's fast delete for the whole project.
"""

from typing import cast

from django.core.signals import setting_changed
from django.db import transaction
from django.db.models.signals import post_delete, post_save

from . import conf
from .keys import TaskKey
from .models import Status, StreamTask
from .tasks import registry, store, wake


def _concrete(sender: type[StreamTask]) -> type[StreamTask]:
    """The model whose table holds the row (a proxy's row is its concrete model's)."""
    return cast("type[StreamTask]", sender._meta.concrete_model or sender)


def _task_saved(sender: type[StreamTask], instance: StreamTask, created: bool, **kwargs: object) -> None:
    key = TaskKey.of(sender, instance.pk)
    transaction.on_commit(lambda: wake.row_changed(key))
    if instance.status == Status.PENDING:
        transaction.on_commit(wake.wake_runners)


def _task_deleted(sender: type[StreamTask], instance: StreamTask, **kwargs: object) -> None:
    store.delete_events(_concrete(sender), [instance.pk])


def _settings_changed(setting: str, **kwargs: object) -> None:
    if setting == "STREAMING":
        conf.reset_settings_cache()
    elif setting == "TASKS":  # EnqueuedTask runs only where TASKS names our backend
        registry.stream_models.cache_clear()


def connect(models: "tuple[type[StreamTask], ...]") -> None:
    for model in models:
        post_save.connect(_task_saved, sender=model, dispatch_uid=f"streaming-saved:{model._meta.label}")
        post_delete.connect(
            _task_deleted, sender=model, dispatch_uid=f"streaming-deleted:{model._meta.label}"
        )
    setting_changed.connect(_settings_changed, dispatch_uid="streaming-settings")
