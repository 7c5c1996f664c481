"""Model signals: wake the runner on new work, drop a task's events with it."""

from django.core.signals import setting_changed
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from . import conf, registry
from .base import Status, StreamTask
from .node import notify_row_changed, wake_runners


@receiver(post_save)
def _task_saved(sender, instance, created, **kwargs):
    if not isinstance(instance, StreamTask):
        return
    key = registry.task_key(sender, instance.pk)
    transaction.on_commit(lambda: notify_row_changed(key))
    if instance.status == Status.PENDING:
        transaction.on_commit(wake_runners)


@receiver(post_delete)
def _task_deleted(sender, instance, **kwargs):
    if isinstance(instance, StreamTask):
        from .store import delete_events

        delete_events(sender._meta.label_lower, [instance.pk])


@receiver(setting_changed)
def _settings_changed(setting, **kwargs):
    if setting == "STREAMING":
        conf.reset_settings_cache()
