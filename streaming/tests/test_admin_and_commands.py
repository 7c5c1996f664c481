"""The admin pages and the maintenance commands, in-process."""

from datetime import timedelta
from io import StringIO

from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import TestCase
from django.utils import timezone

from demo.models import ExampleTask
from streaming.events import Event
from streaming.keys import TaskKey
from streaming.models import TaskEvent
from streaming.tasks.store import write_events


def log(task, *types):
    write_events([(TaskKey.of(task), Event(seq, t, f'{{"n": {seq}}}')) for seq, t in enumerate(types, 1)])


class AdminTests(TestCase):
    def setUp(self):
        self.admin = User.objects.create_superuser("admin", "a@example.com", "pw")
        self.client.force_login(self.admin)

    def test_task_list_shows_status(self):
        ExampleTask.objects.create(status="completed")
        response = self.client.get("/admin/demo/exampletask/")
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "completed")

    def test_task_page_shows_its_event_history(self):
        task = ExampleTask.objects.create(status="completed")
        log(task, "start", "progress", "complete")
        response = self.client.get(f"/admin/demo/exampletask/{task.pk}/change/")
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "streaming-events")
        for event_type in ("start", "progress", "complete"):
            self.assertContains(response, f"<td>{event_type}</td>", html=False)
        self.assertContains(response, "{&quot;n&quot;: 3}")

    def test_cancel_action_requests_cancellation(self):
        task = ExampleTask.objects.create(status="running")
        response = self.client.post(
            "/admin/demo/exampletask/",
            {"action": "cancel_selected", "_selected_action": [task.pk]},
            follow=True,
        )
        self.assertEqual(response.status_code, 200)
        task.refresh_from_db()
        self.assertTrue(task.cancel_requested)


class CleanupTests(TestCase):
    def make(self, status, hours_ago):
        task = ExampleTask.objects.create(status=status)
        ExampleTask.objects.filter(pk=task.pk).update(
            completed_at=timezone.now() - timedelta(hours=hours_ago)
        )
        log(task, "start", "complete")
        return task

    def test_deletes_old_finished_tasks_and_their_events_only(self):
        old = self.make("completed", 30)
        old_failed = self.make("failed", 48)
        recent = self.make("completed", 1)
        running = self.make("running", 100)
        out = StringIO()
        call_command("cleanup_old_tasks", "--hours", "24", "--dry-run", stdout=out)
        self.assertIn("Would delete 2 task(s) and 4 event(s)", out.getvalue())
        self.assertEqual(ExampleTask.objects.count(), 4)
        out = StringIO()
        call_command("cleanup_old_tasks", "--hours", "24", stdout=out)
        self.assertIn("Deleted 2 task(s) and 4 event(s)", out.getvalue())
        remaining = set(ExampleTask.objects.values_list("pk", flat=True))
        self.assertEqual(remaining, {recent.pk, running.pk})
        self.assertEqual(
            set(TaskEvent.objects.values_list("task_id", flat=True)),
            {str(recent.pk), str(running.pk)},
        )
        self.assertNotIn(old.pk, remaining)
        self.assertNotIn(old_failed.pk, remaining)

    def test_negative_hours_is_an_error(self):
        with self.assertRaisesMessage(CommandError, "--hours must not be negative"):
            call_command("cleanup_old_tasks", "--hours", "-1")

    def test_deleting_a_task_deletes_its_events(self):
        task = self.make("completed", 0)
        task.delete()
        self.assertFalse(TaskEvent.objects.filter(task_id=str(task.pk)).exists())
