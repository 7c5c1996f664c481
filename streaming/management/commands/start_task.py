from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ._common import get_task


class Command(BaseCommand):
    help = "Start a task created with `create_task --no-start` (status 'created')."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("model", help="model name, e.g. ExampleTask (or app_label.Model)")
        parser.add_argument("id")

    def handle(self, *args: Any, model: str, id: str, **options: Any) -> None:
        task = get_task(model, id)
        if not task.start():
            raise CommandError(f"{task} cannot be started: it is {task.status}, not 'created'")
        self.stdout.write(self.style.SUCCESS(f"✓ {type(task).stream_name()} {task.pk} queued"))
