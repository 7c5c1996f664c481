from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from streaming.models import FINISHED_STATUSES, TaskEvent
from streaming.tasks.registry import stream_models
from streaming.tasks.store import delete_events


class Command(BaseCommand):
    help = "Delete finished tasks (completed, failed, cancelled) older than --hours, with their events."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--hours", type=float, required=True, help="age of the oldest to keep")
        parser.add_argument("--dry-run", action="store_true", help="only count what would go")

    def handle(self, *args: Any, hours: float, dry_run: bool, **options: Any) -> None:
        if hours < 0:
            raise CommandError("--hours must not be negative")
        cutoff = timezone.now() - timedelta(hours=hours)
        total_tasks = total_events = 0
        for model in stream_models():
            old = model.objects.filter(status__in=FINISHED_STATUSES, completed_at__lt=cutoff)
            pks = list(old.values_list("pk", flat=True))
            if not pks:
                continue
            if dry_run:
                events = TaskEvent.objects.filter(
                    task_type=model._meta.label_lower, task_id__in=[str(p) for p in pks]
                ).count()
            else:
                events = delete_events(model, pks)
                model.objects.filter(pk__in=pks).delete()
            total_tasks += len(pks)
            total_events += events
            self.stdout.write(f"  {model.stream_name()}: {len(pks)} task(s), {events} event(s)")
        verb = "Would delete" if dry_run else "Deleted"
        self.stdout.write(f"{verb} {total_tasks} task(s) and {total_events} event(s) older than {hours:g} h")
