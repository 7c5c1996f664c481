"""Admin for streamable models: status at a glance, actions, the event log followed live.

``StreamTaskAdmin`` is the ModelAdmin to register task models with. Its
change page shows the task's event log (the last ``EVENT_ROWS`` events,
rendered by the server) and ``streaming/admin-tail.js`` follows the task's
stream from there, appending each new event to the table until the terminal
one. The stream is opened with the user's session cookie: it answers when
the task's ``has_stream_permission()`` lets the user in (by default, the
model's view permission).
"""

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import Script
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from .models import FINISHED_STATUSES, StreamTask, TaskEvent

TASK_FIELDS = (
    "status",
    "attempts",
    "created_at",
    "started_at",
    "completed_at",
    "final_value",
    "error",
    "cancel_requested",
    "lease_owner",
    "lease_expires_at",
    "seq_reserved",
)
EVENT_ROWS = 500  # the change page renders the last this many events


def _tasks(count: int) -> str:
    return f"{count} task" if count == 1 else f"{count} tasks"


def _was(count: int) -> str:
    return f"{count} was" if count == 1 else f"{count} were"


class StreamTaskAdmin(admin.ModelAdmin):
    list_display = ("__str__", "status", "attempts", "created_at", "started_at", "completed_at")
    list_filter = ("status", "created_at")
    date_hierarchy = "created_at"
    readonly_fields = (*TASK_FIELDS, "stream_links", "event_history")
    actions = ["start_selected", "rerun_selected", "cancel_selected"]

    class Media:
        # An ES module: it imports streaming.js, the library's JavaScript client.
        js = (Script("streaming/admin-tail.js", type="module"),)

    # -- the change page ------------------------------------------------------

    @admin.display(description="Stream")
    def stream_links(self, task: StreamTask) -> SafeString:
        if task.pk is None:
            return format_html("{}", "-")
        path = task.get_stream_path()
        # $SERVER: admin-tail.js puts the page's own origin in its place.
        curl = format_html(
            "curl -H 'Accept: application/json' <span class=\"streaming-origin\">$SERVER</span>{}{}",
            path,
            "" if task.public_stream else ' -H "Authorization: Bearer $TOKEN"',
        )
        protected = (
            ""
            if task.public_stream
            else mark_safe(  # a constant
                "<br>Protected: $TOKEN is a stream token, e.g. <code>task.stream_token()</code> "
                "in <code>manage.py shell</code>; in this browser, your session opens it when you "
                "may watch the task."
            )
        )
        return format_html(
            '<a href="{}?history=all">{}</a> (Server-Sent Events, every event from the first)'
            "<br>JSON status: <code>{}</code>{}",
            path,
            path,
            curl,
            protected,
        )

    @admin.display(description="Event history")
    def event_history(self, task: StreamTask) -> SafeString:
        """The last EVENT_ROWS events; admin-tail.js goes on from the last one, live."""
        if task.pk is None:
            return format_html("{}", "-")
        log = TaskEvent.objects.filter(task_type=task._meta.label_lower, task_id=str(task.pk))
        events = list(reversed(log.order_by("-seq")[:EVENT_ROWS]))
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            ((e.seq, e.type, e.payload) for e in events),
        )  # fmt: skip
        if not events:
            rows = format_html('<tr class="streaming-empty"><td colspan="3">{}</td></tr>', "No events yet")
        note = ""
        if len(events) == EVENT_ROWS and (total := log.count()) > EVENT_ROWS:
            note = format_html("<p>The last {} events of {}.</p>", EVENT_ROWS, total)
        return format_html(
            '{}<p class="streaming-tail-status"></p>'
            '<table class="streaming-events" data-stream="{}" data-last-seq="{}">'
            "<thead><tr><th>#</th><th>event</th><th>data</th></tr></thead><tbody>{}</tbody></table>",
            note,
            task.get_stream_path(),
            events[-1].seq if events else "",
            rows,
        )

    # -- actions ----------------------------------------------------------------

    @admin.action(description="Start selected tasks (created → queued)", permissions=["change"])
    def start_selected(self, request: HttpRequest, queryset: QuerySet[StreamTask]) -> None:
        tasks = list(queryset)
        started = sum(1 for task in tasks if task.start())
        skipped = len(tasks) - started
        text = f"{_tasks(started)} queued"
        if skipped:
            text += f"; {_was(skipped)} not 'created' (only tasks created with status 'created' start)"
        self.message_user(request, text, messages.WARNING if skipped else messages.SUCCESS)

    @admin.action(description="Run selected finished tasks again, as new tasks", permissions=["add"])
    def rerun_selected(self, request: HttpRequest, queryset: QuerySet[StreamTask]) -> None:
        new: list[StreamTask] = []
        skipped = 0
        for task in queryset:
            try:
                new.append(task.rerun())
            except (ValueError, type(task).DoesNotExist):  # not finished, or gone meanwhile
                skipped += 1
        parts: list[str] = []
        if new:
            links = format_html_join(", ", "{}", ((self._link(task),) for task in new))
            parts.append(format_html("{} queued again as new tasks: {}", _tasks(len(new)), links))
        else:
            parts.append("No task queued again")
        if skipped:
            parts.append(
                format_html(
                    "{} not finished (only completed, failed or cancelled tasks run again)", _was(skipped)
                )
            )
        text = format_html_join("; ", "{}", ((part,) for part in parts))
        self.message_user(request, text, messages.WARNING if skipped else messages.SUCCESS)

    @admin.action(description="Cancel selected tasks", permissions=["change"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[StreamTask]) -> None:
        requested = finished = 0
        for task in queryset:
            if task.cancel() in FINISHED_STATUSES:
                finished += 1
            else:
                requested += 1
        text = f"Cancellation requested for {_tasks(requested)}"
        if finished:
            text += f"; {_was(finished)} already finished"
        self.message_user(request, text, messages.WARNING if finished else messages.SUCCESS)

    def _link(self, task: StreamTask) -> SafeString:
        opts = task._meta
        try:
            url = reverse(
                f"admin:{opts.app_label}_{opts.model_name}_change",
                args=[task.pk],
                current_app=self.admin_site.name,
            )
        except NoReverseMatch:
            return format_html("{}", task)
        return format_html('<a href="{}">{}</a>', url, task)


@admin.register(TaskEvent)
class TaskEventAdmin(admin.ModelAdmin):
    """The event log, read-only: events are written by the runner alone."""

    list_display = ("task_type", "task_id", "seq", "type", "created_at")
    list_filter = ("task_type", "type")
    search_fields = ("task_id",)
    readonly_fields = ("task_type", "task_id", "seq", "type", "payload", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: TaskEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: TaskEvent | None = None) -> bool:
        return False
