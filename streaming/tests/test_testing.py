"""streaming.testing: run_task() and arun_task(), as a user's tests would use them.

Plain django.test.TestCase (the run happens inside the test's transaction),
async test methods, and one TransactionTestCase (real commits).
"""

import asyncio
import json
import time
from datetime import datetime

from django.db import connection, connections
from django.test import TestCase, TransactionTestCase

from demo.models import ContinueTask, ExampleTask
from streaming.models import TaskEvent
from streaming.testing import RecordedEvent, TaskResult, TaskTimeout, arun_task, run_task
from streaming.tests.support import eventually, parse_sse
from streaming.tests.testapp.models import (
    EphemeralTask,
    FragileTask,
    GeneratorTask,
    ScriptedProxy,
    ScriptedTask,
)

EXAMPLE_STEPS = [
    {"step": n, "total_steps": 3, "message": f"Step {n} of 3", "data": f"Processing step {n}..."}
    for n in (1, 2, 3)
]
EXAMPLE_DONE = {"message": "Task completed successfully", "total_steps": 3}


def logged(task) -> list[tuple[int, str, dict]]:
    rows = TaskEvent.objects.filter(task_type=task._meta.label_lower, task_id=str(task.pk)).order_by("seq")
    return [(row.seq, row.type, json.loads(row.payload)) for row in rows]


def triples(events: list[RecordedEvent]) -> list[tuple[int, str, dict]]:
    return [(e.seq, e.type, e.data) for e in events]


def committed_count(model, pk) -> int:
    """Rows with ``pk`` seen from a second connection (committed ones only)."""
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*) FROM {model._meta.db_table} WHERE id = %s", [pk])
            return cursor.fetchone()[0]
    finally:
        other.close()


def continue_when_started(task: ContinueTask):
    """An on_event callback that lets a ContinueTask go on once it has started."""

    def steer(event: RecordedEvent) -> None:
        if event.type == "started":
            ContinueTask.objects.filter(pk=task.pk).update(continue_field=True)

    return steer


class ResultAssertions:
    def assert_example_result(self, result: TaskResult, task: ExampleTask, message: str) -> None:
        self.assertEqual(result.types, ["start", "progress", "progress", "progress", "complete"])
        self.assertEqual([e.seq for e in result.events], [1, 2, 3, 4, 5])
        self.assertEqual(
            [e.fields for e in result.events],
            [{"message": message, "total_steps": 3}, *EXAMPLE_STEPS, EXAMPLE_DONE],
        )
        for event in result.events:
            self.assertEqual(event.data["_task_id"], task.pk)
            self.assertEqual(event.data["_model"], "ExampleTask")
            self.assertIsInstance(datetime.fromisoformat(event.data["_timestamp"]), datetime)
        self.assertEqual(result.status, "completed")
        self.assertEqual(result.final_value, EXAMPLE_DONE)
        self.assertIsNone(result.error)
        # The instance passed in is the refreshed row.
        self.assertIs(result.task, task)
        self.assertEqual(task.status, "completed")
        self.assertEqual(task.attempts, 1)
        self.assertIsNotNone(task.completed_at)
        self.assertIsNone(task.lease_owner)


class RunTaskInTestCaseTests(ResultAssertions, TestCase):
    def test_example_task_events_are_what_clients_receive(self):
        task = ExampleTask.objects.create(message="Hello", step_delay=0)
        result = run_task(task)

        self.assert_example_result(result, task, "Hello")
        # The bytes a stream carries parse back to the same events...
        streamed = parse_sse(b"".join(e.sse for e in result.events).decode())
        self.assertEqual([(m.id, m.event, m.data) for m in streamed], triples(result.events))
        # ...and the event log holds the same ones (same timestamps: the same events).
        self.assertEqual(logged(task), triples(result.events))

    def test_runs_inside_the_tests_transaction(self):
        task = ExampleTask.objects.create(step_delay=0)
        result = run_task(task)

        self.assertEqual(result.status, "completed")
        self.assertTrue(connection.in_atomic_block)
        # Nothing was committed: another connection sees neither the row nor its end.
        self.assertEqual(committed_count(ExampleTask, task.pk), 0)

    def test_failing_task(self):
        task = FragileTask.objects.create(steps=3, fail_at=2)
        result = run_task(task)

        self.assertEqual(result.types, ["step", "error"])
        self.assertEqual(result.events[0].fields, {"step": 1, "attempt": 1})
        self.assertEqual(result.status, "failed")
        self.assertIsNone(result.final_value)
        self.assertEqual(result.error.type, "ValueError")
        self.assertEqual(result.error.message, "failing at step 2 as scripted")
        self.assertEqual(str(result.error), "ValueError: failing at step 2 as scripted")
        self.assertIn("Traceback (most recent call last)", result.error.traceback)
        self.assertIn("ValueError: failing at step 2 as scripted", result.error.traceback)
        self.assertEqual(
            result.events[-1].fields, {"message": "failing at step 2 as scripted", "type": "ValueError"}
        )
        self.assertIn("failed: ValueError: failing at step 2 as scripted", repr(result))
        self.assertEqual(logged(task), triples(result.events))

    def test_generator_tasks(self):
        for use_async in (True, False):
            with self.subTest(use_async=use_async):
                task = GeneratorTask.objects.create(count=3, use_async=use_async)
                result = run_task(task)
                self.assertEqual(result.types, ["progress", "progress", "progress", "complete"])
                self.assertEqual(
                    [e.fields for e in result.of_type("progress")], [{"i": 0}, {"i": 1}, {"i": 2}]
                )
                self.assertEqual(result.final_value, 3)
                self.assertEqual(result.events[-1].fields, {"result": 3})

    def test_steering_a_waiting_task_from_on_event(self):
        task = ContinueTask.objects.create(message="Waiting", poll_interval=30)
        seen = []

        def steer(event: RecordedEvent) -> None:
            seen.append(event.type)
            if event.type == "started":
                ContinueTask.objects.filter(pk=task.pk).update(continue_field=True)

        started = time.monotonic()
        result = run_task(task, on_event=steer, timeout=5)

        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(seen, ["started", "final", "complete"])
        self.assertEqual(result.types, ["started", "final", "complete"])
        self.assertEqual(
            [e.fields for e in result.events],
            [
                {"message": "Waiting", "continue": False},
                {"message": "Continue signal received", "continue": True},
                {"message": "Task completed successfully"},
            ],
        )
        self.assertTrue(task.continue_field)

    def test_a_waiting_task_times_out_with_what_it_was_doing_then_retries(self):
        task = ContinueTask.objects.create(poll_interval=0.05)
        with self.assertRaises(TaskTimeout) as caught:
            run_task(task, timeout=0.3)

        message = str(caught.exception)
        self.assertIn(f"ContinueTask {task.pk} did not end within 0.3 s", message)
        self.assertIn("Last event: #1 'started'", message)
        self.assertIn("demo.models", message)
        self.assertIn("wait_until", message)
        self.assertIn("'pending'", message)
        self.assertEqual([e.type for e in caught.exception.events], ["started"])
        # Interrupted as a server shutdown would: ContinueTask retries, so back to pending.
        task.refresh_from_db()
        self.assertEqual((task.status, task.attempts, task.lease_owner), ("pending", 1, None))

        # The second run is the recovery run: a retry event, numbered past the first run's block.
        result = run_task(task, on_event=continue_when_started(task))
        self.assertEqual(result.types, ["retry", "started", "final", "complete"])
        self.assertEqual([e.seq for e in result.events], [1001, 1002, 1003, 1004])
        self.assertEqual(
            result.events[0].fields,
            {"message": "Running again after an interruption", "attempt": 2, "max_attempts": 3},
        )
        self.assertEqual(task.attempts, 2)
        self.assertEqual(
            [(seq, type_) for seq, type_, _ in logged(task)],
            [(1, "started")] + [(e.seq, e.type) for e in result.events],
        )

    def test_timeout_of_a_fail_policy_task_fails_it_as_interrupted(self):
        task = FragileTask.objects.create(steps=2, delay=30)
        with self.assertRaises(TaskTimeout) as caught:
            run_task(task, timeout=0.2)

        self.assertIn("Last event: #1 'step' {'step': 1, 'attempt': 1}", str(caught.exception))
        self.assertIn("in sleep", str(caught.exception))
        self.assertIn("failed with an 'Interrupted' error event", str(caught.exception))
        task.refresh_from_db()
        self.assertEqual(task.status, "failed")
        self.assertEqual([(seq, type_) for seq, type_, _ in logged(task)], [(1, "step"), (2, "error")])
        self.assertEqual(logged(task)[-1][2]["type"], "Interrupted")

    def test_cancel_from_on_event_lands_before_the_next_step(self):
        task = ScriptedTask.objects.create(steps=5)

        def cancel_at_step_2(event: RecordedEvent) -> None:
            if event.fields.get("step") == 2:
                task.cancel()

        result = run_task(task, on_event=cancel_at_step_2)

        self.assertEqual(result.types, ["step", "step", "cancelled"])
        self.assertEqual(result.events[-1].fields, {"message": "Task cancelled"})
        self.assertEqual(result.status, "cancelled")
        self.assertIsNone(result.error)
        self.assertEqual(logged(task), triples(result.events))

    def test_cancelled_before_it_runs(self):
        task = ScriptedTask.objects.create(steps=5)
        task.cancel()
        result = run_task(task)
        self.assertEqual(triples(result.events)[0][:2], (1, "cancelled"))
        self.assertEqual(result.types, ["cancelled"])
        self.assertEqual(task.attempts, 1)

    def test_a_failing_on_event_fails_the_test_and_stops_the_task(self):
        task = FragileTask.objects.create(steps=5)

        def check(event: RecordedEvent) -> None:
            assert event.fields["step"] < 2, "step 2 reached"

        with self.assertRaisesMessage(AssertionError, "step 2 reached"):
            run_task(task, on_event=check)
        task.refresh_from_db()
        self.assertEqual(task.status, "failed")  # FragileTask's policy: interrupted means failed
        self.assertEqual([type_ for _, type_, _ in logged(task)], ["step", "step", "error"])

    def test_events_that_only_live_clients_see(self):
        task = EphemeralTask.objects.create(steps=2, result={"ok": True})
        result = run_task(task)
        self.assertEqual(result.types, ["step", "step", "complete"])
        self.assertEqual(logged(task), triples(result.events[-1:]))  # persist_events = False

    def test_clear_errors(self):
        with self.assertRaisesMessage(TypeError, "not the class"):
            run_task(ExampleTask)
        with self.assertRaisesMessage(TypeError, "takes a StreamTask instance, not TaskEvent"):
            run_task(TaskEvent())
        with self.assertRaisesMessage(ValueError, "This ExampleTask is not saved"):
            run_task(ExampleTask(step_delay=0))
        created = ExampleTask.objects.create(status="created", step_delay=0)
        with self.assertRaisesMessage(ValueError, "is 'created' (not started): call task.start()"):
            run_task(created)
        finished = ExampleTask.objects.create(step_delay=0)
        run_task(finished)
        with self.assertRaisesMessage(ValueError, f"ExampleTask {finished.pk} has already ended (completed)"):
            run_task(finished)
        gone = ExampleTask.objects.create(step_delay=0)
        ExampleTask.objects.filter(pk=gone.pk).delete()
        with self.assertRaisesMessage(ValueError, "does not exist in the database"):
            run_task(gone)
        proxied = ScriptedProxy.objects.create(steps=1)
        with self.assertRaisesMessage(TypeError, "ScriptedProxy is a proxy model: a server runs its row as"):
            run_task(proxied)


class ArunTaskTests(ResultAssertions, TestCase):
    async def test_example_task(self):
        task = await ExampleTask.objects.acreate(message="async", step_delay=0)
        result = await arun_task(task)
        self.assert_example_result(result, task, "async")

    async def test_steering_with_an_async_callback(self):
        task = await ContinueTask.objects.acreate(poll_interval=30)

        async def steer(event: RecordedEvent) -> None:
            if event.type == "started":
                await ContinueTask.objects.filter(pk=task.pk).aupdate(continue_field=True)

        result = await arun_task(task, on_event=steer, timeout=5)
        self.assertEqual(result.types, ["started", "final", "complete"])
        self.assertEqual(result.events[1].fields, {"message": "Continue signal received", "continue": True})

    async def test_steering_from_a_concurrent_coroutine(self):
        task = await ContinueTask.objects.acreate(poll_interval=0.02)

        async def steer() -> None:
            running = ContinueTask.objects.filter(pk=task.pk, status="running")
            await eventually(running.aexists, message="the task to run")
            await ContinueTask.objects.filter(pk=task.pk).aupdate(continue_field=True)

        result, _ = await asyncio.gather(arun_task(task, timeout=5), steer())
        self.assertEqual(result.types, ["started", "final", "complete"])

    async def test_cancel_from_a_concurrent_coroutine(self):
        task = await ScriptedTask.objects.acreate(steps=200, delay=0.01)

        async def cancel_once_running() -> None:
            await eventually(ScriptedTask.objects.filter(pk=task.pk, status="running").aexists)
            await task.acancel()

        result, _ = await asyncio.gather(arun_task(task, timeout=5), cancel_once_running())
        self.assertEqual(result.status, "cancelled")
        self.assertEqual(result.types[-1], "cancelled")
        self.assertEqual(set(result.types[:-1]), {"step"})
        self.assertLess(len(result.events), 150)  # stopped well before its end

    async def test_failing_task(self):
        task = await FragileTask.objects.acreate(steps=2, fail_at=1)
        result = await arun_task(task)
        self.assertEqual(result.types, ["error"])
        self.assertEqual(
            (result.error.type, result.error.message), ("ValueError", "failing at step 1 as scripted")
        )

    async def test_run_task_in_async_code_points_to_arun_task(self):
        task = await ExampleTask.objects.acreate(step_delay=0)
        with self.assertRaisesMessage(RuntimeError, "use `await arun_task(...)`"):
            run_task(task)


class RunTaskCommittedTests(ResultAssertions, TransactionTestCase):
    def test_with_real_commits(self):
        task = ExampleTask.objects.create(message="committed", step_delay=0)
        result = run_task(task)
        self.assert_example_result(result, task, "committed")
        self.assertEqual(committed_count(ExampleTask, task.pk), 1)
        self.assertEqual(logged(task), triples(result.events))
