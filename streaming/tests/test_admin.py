"""The admin, and the model API behind its actions: ``rerun()``."""

from asgiref.sync import async_to_sync
from django.test import TestCase

from demo.models import ContinueTask, ExampleTask
from streaming.tests.testapp.models import ScriptedTask


class RerunTests(TestCase):
    def test_copies_the_tasks_own_fields_and_none_of_the_bookkeeping(self):
        task = ScriptedTask.objects.create(
            steps=7, delay=0.5, payload_size=3, fail_at=2, result={"r": [1]}, status="failed",
            attempts=2, error="Traceback ...", final_value={"old": True}, seq_reserved=40,
            lease_owner="node-1", cancel_requested=True,
        )  # fmt: skip
        ScriptedTask.objects.filter(pk=task.pk).update(
            started_at=task.created_at, completed_at=task.created_at
        )
        new = task.rerun()
        self.assertNotEqual(new.pk, task.pk)
        new = ScriptedTask.objects.get(pk=new.pk)
        self.assertEqual(
            (new.steps, new.delay, new.payload_size, new.fail_at, new.result), (7, 0.5, 3, 2, {"r": [1]})
        )
        self.assertEqual(
            (new.status, new.attempts, new.error, new.final_value, new.seq_reserved),
            ("pending", 0, "", None, 0),
        )
        self.assertEqual(
            (new.lease_owner, new.cancel_requested, new.started_at, new.completed_at),
            (None, False, None, None),
        )
        self.assertGreaterEqual(new.created_at, task.created_at)
        task.refresh_from_db()
        self.assertEqual((task.status, task.attempts), ("failed", 2))  # the old row stays as it was

    def test_reads_the_row_afresh(self):
        task = ContinueTask.objects.create(status="running", message="first")
        ContinueTask.objects.filter(pk=task.pk).update(status="completed", message="from the row")
        self.assertEqual(task.rerun().message, "from the row")  # self.status was still "running"

    def test_refuses_a_task_that_is_not_finished(self):
        for status in ("created", "pending", "running"):
            task = ExampleTask.objects.create(status=status)
            with self.assertRaisesMessage(
                ValueError,
                f"ExampleTask {task.pk} is {status}: only a finished task (completed, failed or "
                "cancelled) can run again",
            ):
                task.rerun()
        self.assertEqual(ExampleTask.objects.count(), 3)

    def test_arerun(self):
        task = ExampleTask.objects.create(status="cancelled", message="async")
        new = async_to_sync(task.arerun)()
        self.assertEqual((new.status, new.message), ("pending", "async"))
