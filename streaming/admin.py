"""Admin for streamable models: status at a glance, event history on the page."""

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from .models import StreamTask, TaskEvent

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


class StreamTaskAdmin(admin.ModelAdmin):
    list_display = ("__str__", "status", "attempts", "created_at", "started_at", "completed_at")
    list_filter = ("status",)
    readonly_fields = (*TASK_FIELDS, "event_history")
    actions = ["cancel_selected"]

    def event_history(self, task: StreamTask) -> str:
        events = TaskEvent.objects.filter(task_type=task._meta.label_lower, task_id=str(task.pk)).order_by(
            "seq"
        )[:500]
        if not events:
            return "No events yet"
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            ((e.seq, e.type, e.payload) for e in events),
        )  # fmt: skip
        return format_html(
            '<table class="streaming-events"><tr><th>#</th><th>event</th><th>data</th></tr>{}</table>',
            rows,
        )

    @admin.action(description="Cancel selected tasks")
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[StreamTask]) -> None:
        for task in queryset:
            task.cancel()
        self.message_user(request, f"Cancellation requested for {queryset.count()} task(s)")


@admin.register(TaskEvent)
class TaskEventAdmin(admin.ModelAdmin):
    list_display = ("task_type", "task_id", "seq", "type", "created_at")
    list_filter = ("task_type", "type")
    search_fields = ("task_id",)
    readonly_fields = ("task_type", "task_id", "seq", "type", "payload", "created_at")
