"""The dashboard's pages, its JSON list and its actions (mounted by ``streaming.urls``)."""

import json
from collections import Counter
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_POST

from ..models import FINISHED_STATUSES, Status, StreamTask, TaskEvent
from ..tasks.registry import UnknownModel, resolve_model
from . import access, rows

View = Callable[..., HttpResponse]
ACTIVE_STATUSES = (Status.CREATED, Status.PENDING, Status.RUNNING)
BOOKKEEPING = {field.name for field in StreamTask._meta.local_fields}


class BadInput(ValueError):
    """A query parameter the dashboard cannot use; its message says which and why."""


def dashboard_view(view: View) -> View:
    """Anonymous users go to the login page (JSON: 401); users the gate refuses get 403."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        wants_json = request.path.endswith(".json")
        if not request.user.is_authenticated:
            if wants_json:
                return JsonResponse({"error": "Log in to see tasks"}, status=401)
            return redirect_to_login(request.get_full_path())
        if not access.may_open(request.user):
            if wants_json:
                return JsonResponse({"error": "You may not see the task dashboard"}, status=403)
            raise PermissionDenied("You may not see the task dashboard")
        try:
            return view(request, *args, **kwargs)
        except BadInput as exc:
            if wants_json:
                return JsonResponse({"error": str(exc)}, status=400)
            return HttpResponseBadRequest(f"{exc}\n", content_type="text/plain; charset=utf-8")

    return wrapped


def _render(request: HttpRequest, template: str, context: dict[str, Any]) -> HttpResponse:
    # The messages of the actions, whether or not the project's templates use
    # the messages context processor.
    return render(request, template, {**context, "messages": messages.get_messages(request)})


def _filters(request: HttpRequest) -> tuple[list[type[StreamTask]], str | None, int]:
    """The models, status and page the query asks for, among those the user may see."""
    models = access.viewable_models(request.user)
    wanted = request.GET.get("model", "")
    if wanted:
        chosen = [m for m in models if rows.model_id(m) == wanted]
        if not chosen:
            names = ", ".join(rows.model_id(m) for m in models) or "none"
            raise BadInput(f"Unknown model {wanted!r}: use one of the models you may see ({names})")
        models = chosen
    status = request.GET.get("status", "") or None
    if status is not None and status not in Status.values:
        raise BadInput(f"Unknown status {status!r}: use one of {', '.join(Status.values)}")
    raw_page = request.GET.get("page", "1")
    if not raw_page.isdecimal() or not 1 <= int(raw_page) <= rows.MAX_PAGE:
        raise BadInput(
            f"Bad page {raw_page!r}: a number from 1 to {rows.MAX_PAGE} (the newest "
            f"{rows.MAX_PAGE * rows.PAGE_SIZE:,} tasks); filter by model or status to reach older ones"
        )
    return models, status, int(raw_page)


@require_GET
@dashboard_view
def task_list(request: HttpRequest) -> HttpResponse:
    """The page: filters and an empty table that dashboard.js fills and keeps live."""
    models, status, page = _filters(request)
    user: Any = request.user  # signed in: dashboard_view sent anonymous users away
    viewable = access.viewable_models(user)
    config = {
        "rows": reverse("streaming:task-rows"),
        "filters": {"model": request.GET.get("model", ""), "status": status or "", "page": page},
        # The models whose every task the user may follow (has_feed_permission);
        # the others' rows are shown as loaded.
        "feeds": [rows.feed_name(m) for m in models if m.has_feed_permission(user)],
        # By app_label/Model, as rows and the feeds name them: two apps may have
        # task models of one class name.
        "models": {rows.feed_name(m): rows.model_id(m) for m in viewable},
    }
    shared = _shared_names(viewable)
    return _render(
        request,
        "streaming/dashboard/list.html",
        {
            "models": [
                (
                    rows.model_id(m),
                    f"{m._meta.verbose_name} ({m._meta.app_label})"
                    if m.__name__ in shared
                    else str(m._meta.verbose_name),
                )
                for m in viewable
            ],
            "statuses": Status.choices,
            "selected_model": request.GET.get("model", ""),
            "selected_status": status or "",
            "config": config,
        },
    )


def _shared_names(models: list[type[StreamTask]]) -> set[str]:
    """The class names that more than one of ``models`` has (in different apps)."""
    counts = Counter(m.__name__ for m in models)
    return {name for name, count in counts.items() if count > 1}


@require_GET
@dashboard_view
def task_rows(request: HttpRequest) -> JsonResponse:
    """A page of rows as JSON (``model``, ``status``, ``page``); with ``model``, ``id``
    (repeatable, at most a page's worth) picks those tasks; one ``id`` brings its outcome too."""
    models, status, page = _filters(request)
    pks = None
    if raw_ids := request.GET.getlist("id"):
        if not request.GET.get("model"):
            raise BadInput("id needs model: ?model=<app_label.Model>&id=<id>")
        if len(raw_ids) > rows.PAGE_SIZE:
            raise BadInput(f"Too many ids ({len(raw_ids)}): at most {rows.PAGE_SIZE} a request")
        model = models[0]
        pks = [_pk(model, raw, BadInput(f"Bad id {raw!r} for {rows.model_id(model)}")) for raw in raw_ids]
    found, has_next = rows.list_rows(models, status=status, page=page, pks=pks)
    if pks is not None and len(pks) == 1 and found:  # one task (its page): its outcome too
        task = models[0].objects.get(pk=pks[0])
        found[0]["final_value"] = task.final_value if task.status == Status.COMPLETED else None
        found[0]["error"] = _error(task)
    return JsonResponse({"tasks": found, "page": page, "has_next": has_next, "page_size": rows.PAGE_SIZE})


def rows_url(model: type[StreamTask], pk: object) -> str:
    """tasks.json for one task: what its page reads when its status changes."""
    return f"{reverse('streaming:task-rows')}?{urlencode({'model': rows.model_id(model), 'id': str(pk)})}"


def _pk(model: type[StreamTask], raw: str, error: Exception) -> Any:
    try:
        return model._meta.pk.to_python(raw)
    except ValidationError:
        raise error from None


def _task(request: HttpRequest, app_label: str, model_name: str, pk: str) -> StreamTask:
    """The task the URL names, once the user may see its model (403 before any lookup, else 404)."""
    try:
        model = resolve_model(model_name, app_label)
    except UnknownModel:
        raise Http404(f"No task model {app_label}.{model_name}") from None
    if not access.may_view(request.user, model):
        raise PermissionDenied(f"You may not see {model._meta.verbose_name_plural}")
    missing = Http404(f"No {model.__name__} {pk}")
    task = model.objects.filter(pk=_pk(model, pk, missing)).first()
    if task is None:
        raise missing
    return task


def _error(task: StreamTask) -> dict[str, str] | None:
    """A failed task's error type and message, as its error event says (the JSON status's rule)."""
    if task.status != Status.FAILED:
        return None
    event = TaskEvent.objects.filter(
        task_type=task._meta.label_lower, task_id=str(task.pk), type="error"
    ).last()
    if event is not None:
        data = json.loads(event.payload)
        return {"type": str(data.get("type", "")), "message": str(data.get("message", ""))}
    return {"type": "Error", "message": "The task failed"}


@require_GET
@dashboard_view
def task_page(request: HttpRequest, app_label: str, model_name: str, pk: str) -> HttpResponse:
    """One task: its fields, status, result or error, its event log tailing live, and actions."""
    task = _task(request, app_label, model_name, pk)
    model = type(task)
    own_fields = [
        (field.verbose_name, field.value_from_object(task))
        for field in model._meta.concrete_fields
        if not field.primary_key
        and field.name not in BOOKKEEPING
        and not (field.remote_field is not None and field.remote_field.parent_link)
    ]
    config = {
        "stream": task.get_stream_path(),
        "row": rows_url(model, task.pk),
        "status": task.status,
    }
    return _render(
        request,
        "streaming/dashboard/task.html",
        {
            "task": task,
            "task_class": model.__name__,
            "app_label": model._meta.app_label,
            "model_id": rows.model_id(model),
            "model_name": model._meta.verbose_name,
            "own_fields": own_fields,
            "final_value": json.dumps(task.final_value, indent=2, ensure_ascii=False)
            if task.status == Status.COMPLETED
            else None,
            "error": _error(task),
            "can_change": access.may_change(request.user, model),
            "can_add": access.may_add(request.user, model),
            "finished": task.status in FINISHED_STATUSES,
            "active": task.status in ACTIVE_STATUSES,
            "config": config,
        },
    )


def _action(permission: Callable[[Any, type[StreamTask]], bool], verb: str) -> Callable[[View], View]:
    """A POST action on one task: 405 for other methods, 403 without ``permission``."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapped(request: HttpRequest, app_label: str, model_name: str, pk: str) -> HttpResponse:
            task = _task(request, app_label, model_name, pk)
            if not permission(request.user, type(task)):
                raise PermissionDenied(f"You may not {verb} {type(task)._meta.verbose_name_plural}")
            return view(request, task)

        return require_POST(dashboard_view(wrapped))

    return decorate


def _name(task: StreamTask) -> str:
    return f"{type(task).__name__} {task.pk}"


@_action(access.may_change, "cancel")
def cancel_task(request: HttpRequest, task: StreamTask) -> HttpResponse:
    status = task.cancel()
    if status in FINISHED_STATUSES:
        messages.warning(
            request, f"{_name(task)} had already finished ({status}): nothing to cancel", fail_silently=True
        )
    else:
        messages.success(request, f"Cancellation requested for {_name(task)}", fail_silently=True)
    return redirect(rows.page_url(type(task), task.pk))


@_action(access.may_change, "start")
def start_task(request: HttpRequest, task: StreamTask) -> HttpResponse:
    if task.start():
        messages.success(request, f"{_name(task)} queued", fail_silently=True)
    else:
        task.refresh_from_db(fields=["status"])
        messages.error(
            request,
            f"{_name(task)} is {task.status}: only a task created with status 'created' (--no-start) starts",
            fail_silently=True,
        )
    return redirect(rows.page_url(type(task), task.pk))


@_action(access.may_add, "re-run")
def rerun_task(request: HttpRequest, task: StreamTask) -> HttpResponse:
    try:
        new = task.rerun()
    except ValueError as exc:
        messages.error(request, str(exc), fail_silently=True)
        return redirect(rows.page_url(type(task), task.pk))
    messages.success(request, f"{_name(task)} runs again as {_name(new)}", fail_silently=True)
    return redirect(rows.page_url(type(new), new.pk))
