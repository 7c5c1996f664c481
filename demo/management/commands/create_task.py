import time

from django.core.management.base import BaseCommand

from demo.models import ContinueTask, ExampleTask
from streaming import Status

TYPES = {"example": ExampleTask, "continue": ContinueTask}


class Command(BaseCommand):
    help = (
        "Create a demo task. The streaming server (runserver_stream) picks it up and runs it; "
        "with --no-start it waits until `manage.py start_task <Model> <id>`."
    )

    def add_arguments(self, parser):
        parser.add_argument("--type", choices=sorted(TYPES), default="example")
        parser.add_argument("--message", help="the task's message")
        parser.add_argument(
            "--no-start", action="store_true", help="create it without starting (see start_task)"
        )
        parser.add_argument("--delay", type=float, help="ExampleTask: seconds between progress steps (2)")
        parser.add_argument("--host", default="127.0.0.1", help="server host shown in the hint")
        parser.add_argument("--port", type=int, default=8888, help="server port shown in the hint")

    def handle(self, *args, type, message, no_start, delay, host, port, **options):
        model = TYPES[type]
        fields = {"status": Status.CREATED if no_start else Status.PENDING}
        if message is not None:
            fields["message"] = message
        if delay is not None and model is ExampleTask:
            fields["step_delay"] = delay
        task = model.objects.create(**fields)
        name = model.stream_name()
        out = self.stdout.write
        out(f"Created {name} with ID: {task.pk}")
        out(f"  Message: {task.message}")
        if model is ContinueTask:
            out(f"  Continue: {task.continue_field}")
            out("")
            out("  To continue the task, run:")
            out(
                '    poetry run python manage.py shell -c "from streaming.models import ContinueTask; '
                "import asyncio; asyncio.run(ContinueTask.objects.filter("
                f'pk={task.pk}).aupdate(continue_field=True))"'
            )
        out("")
        if no_start:
            out("Not started (--no-start). Start it with:")
            out(f"  poetry run python manage.py start_task {name} {task.pk}")
            return
        out("Starting task...")
        if self._wait_until_claimed(task):
            out(self.style.SUCCESS("✓ Task started"))
        else:
            out(
                "✓ Task queued: no streaming server has taken it yet; it starts as soon as one "
                "runs (poetry run python manage.py runserver_stream)"
            )
        out("")
        out("Connect to task stream:")
        out(f"  curl http://{host}:{port}{task.get_stream_path()}")

    @staticmethod
    def _wait_until_claimed(task, timeout=2.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task.refresh_from_db(fields=["status"])
            if task.status != Status.PENDING:
                return True
            time.sleep(0.05)
        return False
