"""Tasks as the dashboard shows them: rows of every model, newest first, with their latest event."""

import json
from typing import Any

from django.db.models import OuterRef, Subquery
from django.urls import reverse

from ..keys import TaskKey
from ..models import Status, StreamTask, TaskEvent

PAGE_SIZE = 50
# The list's last page. A page reads page * PAGE_SIZE + 1 rows per model
# (list_rows): at most 5,001 here. Older tasks: filter by model or status.
MAX_PAGE = 100
ROW_FIELDS = ("pk", "status", "attempts", "created_at", "started_at", "completed_at")


def model_id(model: type[StreamTask]) -> str:
    """How the dashboard names a model in its filters: its label, ``app_label.ModelName``."""
    return model._meta.label


def feed_name(model: type[StreamTask]) -> str:
    """How the multiplexed stream names a model: ``app_label/ModelName``."""
    return f"{model._meta.app_label}/{model.__name__}"


def page_url(model: type[StreamTask], pk: object) -> str:
    return reverse("streaming:task", args=[model._meta.app_label, model.__name__, pk])


def latest_events(model: type[StreamTask], pks: list[object]) -> dict[str, TaskEvent]:
    """Each task's latest logged event (one query), by pk as text."""
    if not pks:
        return {}
    label = TaskKey.of(model).label
    newest = TaskEvent.objects.filter(task_type=label, task_id=OuterRef("task_id")).order_by("-seq")
    events = TaskEvent.objects.filter(
        task_type=label, task_id__in=[str(pk) for pk in pks], seq=Subquery(newest.values("seq")[:1])
    )
    return {event.task_id: event for event in events}


def _iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def event_json(event: TaskEvent | None) -> dict[str, Any] | None:
    if event is None:
        return None
    try:
        data = json.loads(event.payload)
    except ValueError:
        data = event.payload
    return {"id": event.seq, "type": event.type, "data": data}


def row(task: StreamTask, latest: TaskEvent | None) -> dict[str, Any]:
    """One task as the list shows it (and as dashboard.js draws it)."""
    model = type(task)
    return {
        # As the page's feeds name it (app_label/Model/id): events say only the
        # class name (_model), which two apps' task models may share.
        "key": f"{feed_name(model)}/{task.pk}",
        "model": model_id(model),
        "model_name": str(model._meta.verbose_name),
        "id": task.pk,
        "status": task.status,
        "status_label": Status(task.status).label if task.status in Status.values else task.status,
        "attempts": task.attempts,
        "created_at": _iso(task.created_at),
        "started_at": _iso(task.started_at),
        "completed_at": _iso(task.completed_at),
        "latest": event_json(latest),
        "url": page_url(model, task.pk),
    }


def list_rows(
    models: list[type[StreamTask]], *, status: str | None = None, page: int = 1, pks: list[Any] | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """A page of rows across ``models``, newest first, and whether an older page exists.

    Each model gives its newest ``page * PAGE_SIZE + 1`` rows (one indexed query
    each), merged by creation time: cheap for the first pages, which are the
    ones a live list is for. Not an OFFSET per model: where a page starts in
    one model depends on the others' newer rows. MAX_PAGE bounds the rows
    read; its page says no older page.
    """
    take = page * PAGE_SIZE + 1
    tasks: list[StreamTask] = []
    for model in models:
        rows = model.objects.only(*ROW_FIELDS).order_by("-created_at", "-pk")
        if status:
            rows = rows.filter(status=status)
        if pks is not None:
            rows = rows.filter(pk__in=pks)
        tasks.extend(rows[:take])
    tasks.sort(key=lambda t: (t.created_at, t._meta.label, t.pk), reverse=True)
    shown = tasks[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    latest: dict[tuple[str, str], TaskEvent] = {}
    for model in models:
        on_page = [t.pk for t in shown if type(t) is model]
        latest.update({(model_id(model), pk): e for pk, e in latest_events(model, on_page).items()})
    has_next = len(tasks) > page * PAGE_SIZE and page < MAX_PAGE
    return [row(t, latest.get((model_id(type(t)), str(t.pk)))) for t in shown], has_next
