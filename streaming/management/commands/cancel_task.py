from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from streaming.models import FINISHED_STATUSES

from ._common import get_task


class Command(BaseCommand):
    help = "Cancel a task: its runner stops it and watchers get a 'cancelled' event."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", help="model name, e.g. ExampleTask (or app_label.Model)")
        parser.add_argument("id")

    def handle(self, *args: Any, model: str, id: str, **options: Any) -> None:
        task = get_task(model, id)
        name = f"{type(task).stream_name()} {task.pk}"
        if task.is_finished:
            self.stdout.write(f"{name} is already {task.status}; nothing to cancel")
            return
        status = task.cancel()
        if status in FINISHED_STATUSES:
            self.stdout.write(f"{name} is already {status}; nothing to cancel")
        else:
            self.stdout.write(self.style.SUCCESS(f"✓ Cancellation of {name} requested; its runner stops it"))
