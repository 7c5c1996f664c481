from django.core.management.base import CommandError

from streaming.models import StreamTask
from streaming.tasks.registry import UnknownModel, resolve_model


def get_task(model_name: str, task_id: str) -> StreamTask:
    app_label, _, name = model_name.rpartition(".")
    try:
        model = resolve_model(name, app_label or None)
    except UnknownModel as exc:
        raise CommandError(str(exc)) from None
    try:
        pk = model._meta.pk.to_python(task_id)
        return model.objects.get(pk=pk)
    except model.DoesNotExist:
        raise CommandError(f"{model.stream_name()} {task_id} does not exist") from None
    except Exception:
        raise CommandError(f"Malformed task id {task_id!r}") from None
