"""The runner in process: a real Node in the test's event loop, no HTTP server.

TransactionTestCase, because the runner's ORM calls run through
sync_to_async and must see committed rows. Async test methods run under
async_to_sync, so those calls come back to the test thread and its database
connection. Every wait polls for a condition with a deadline.
"""

import asyncio
import json
import threading
import time
from collections import Counter
from datetime import timedelta
from unittest import mock

from asgiref.sync import async_to_sync, sync_to_async
from django.db import DatabaseError, OperationalError, connection, connections
from django.test import TransactionTestCase
from django.utils import timezone

from demo.models import ContinueTask
from streaming.events import RESERVED_TYPES, Event, build_payload
from streaming.keys import TaskKey
from streaming.models import TaskEvent
from streaming.node import Node, current_node
from streaming.tasks import store
from streaming.tests.support import eventually, node_settings, parse_sse
from streaming.tests.testapp.models import EphemeralTask, FragileTask, GeneratorTask, ScriptedTask

META_KEYS = {"_task_id", "_model", "_timestamp"}
# Linux pids stay below pid_max, at most 2**22: no process has this one.
DEAD_OWNER = f"{store.HOSTNAME}:{2**22 + 12345}:deadbeef"


def data_of(event) -> dict:
    return json.loads(event.payload)


def fields_of(data: dict) -> dict:
    """An event's data without the _task_id, _model and _timestamp the runner adds."""
    return {k: v for k, v in data.items() if k not in META_KEYS}


def logged_sync(task) -> list[TaskEvent]:
    return list(
        TaskEvent.objects.filter(task_type=task._meta.label_lower, task_id=str(task.pk)).order_by("seq")
    )


logged = sync_to_async(logged_sync)


def summary(events) -> list[tuple[int, str]]:
    return [(e.seq, e.type) for e in events]


async def wait_status(task, *statuses, timeout=5.0):
    async def reached():
        await task.arefresh_from_db()
        return task.status in statuses

    await eventually(reached, timeout=timeout, message=f"{task} to reach {statuses}")
    return task


async def wait_logged(task, predicate, *, timeout=5.0, message="logged events"):
    async def check():
        events = await logged(task)
        return events if predicate(events) else None

    return await eventually(check, timeout=timeout, message=f"{message} of {task}")


async def read_subscription(node, key, after, *, timeout=5.0):
    """Everything node.hub.subscribe(key, after) yields, parsed, up to its end."""
    chunks = []
    async with asyncio.timeout(timeout):
        async for chunk in node.hub.subscribe(key, after):
            chunks.append(chunk)
    return parse_sse(b"".join(chunks).decode())


def make_orphan(model, owner, *, expires_in, attempts=1, logged_steps=2, **fields):
    """A row left 'running' by a runner that is gone, with some events already logged."""
    now = timezone.now()
    task = model.objects.create(
        status="running",
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=expires_in),
        attempts=attempts,
        seq_reserved=1000,
        started_at=now - timedelta(seconds=5),
        **fields,
    )
    store.write_events(
        [
            (
                TaskKey.of(task),
                Event(
                    seq,
                    "step",
                    build_payload(
                        {"step": seq, "attempt": attempts}, task_id=task.pk, model_name=model.stream_name()
                    ),
                ),
            )
            for seq in range(1, logged_steps + 1)
        ]
    )
    return task


class RunnerTestCase(TransactionTestCase):
    def assert_finished_row(self, task, status):
        self.assertEqual(task.status, status)
        self.assertIsNotNone(task.started_at)
        self.assertIsNotNone(task.completed_at)
        self.assertLessEqual(task.started_at, task.completed_at)
        self.assertIsNone(task.lease_owner)
        self.assertIsNone(task.lease_expires_at)


class CompletionTests(RunnerTestCase):
    async def test_pending_task_is_claimed_and_completed_without_a_subscriber(self):
        result = {"answer": 42, "items": [1, "two", None], "nested": {"ok": True}}
        async with Node(node_settings()) as node:
            task = await ScriptedTask.objects.acreate(steps=3, result=result)
            key = TaskKey.of(ScriptedTask, task.pk)
            await wait_status(task, "completed")
            await eventually(lambda: key not in node.runner.runs, message="the run to end")
            replayed = await read_subscription(node, key, 0)

        self.assert_finished_row(task, "completed")
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.final_value, result)
        self.assertEqual(task.error, "")
        self.assertFalse(task.cancel_requested)
        self.assertGreaterEqual(task.seq_reserved, 4)

        events = await logged(task)
        self.assertEqual(summary(events), [(1, "step"), (2, "step"), (3, "step"), (4, "complete")])
        self.assertEqual(
            [fields_of(data_of(e)) for e in events[:3]],
            [{"step": 1, "attempt": 1}, {"step": 2, "attempt": 1}, {"step": 3, "attempt": 1}],
        )
        complete = data_of(events[-1])
        self.assertEqual(fields_of(complete), result)
        self.assertEqual(complete["_task_id"], task.pk)
        self.assertEqual(complete["_model"], "ScriptedTask")
        # A late subscriber replays the same events from the log.
        self.assertEqual([(e.id, e.event) for e in replayed], summary(events))
        self.assertEqual(replayed[-1].data, complete)

    async def test_non_dict_and_none_returns(self):
        async with Node(node_settings()):
            listed = await ScriptedTask.objects.acreate(steps=1, result=[1, "two", None])
            scalar = await ScriptedTask.objects.acreate(steps=0, result="done")
            nothing = await ScriptedTask.objects.acreate(steps=1, result=None)
            for task in (listed, scalar, nothing):
                await wait_status(task, "completed")

        cases = [(listed, [1, "two", None], 2), (scalar, "done", 1), (nothing, None, 2)]
        for task, value, last_seq in cases:
            with self.subTest(result=value):
                self.assertEqual(task.final_value, value)
                events = await logged(task)
                self.assertEqual(events[-1].type, "complete")
                self.assertEqual(events[-1].seq, last_seq)
                self.assertEqual([e.seq for e in events], list(range(1, last_seq + 1)))
                expected = {} if value is None else {"result": value}
                self.assertEqual(fields_of(data_of(events[-1])), expected)

    async def test_process_raising_ends_with_an_error_event(self):
        async with Node(node_settings()):
            task = await ScriptedTask.objects.acreate(steps=3, fail_at=2)
            await wait_status(task, "failed")

        self.assert_finished_row(task, "failed")
        self.assertEqual(task.attempts, 1)  # a raise is a failure, never retried
        self.assertIsNone(task.final_value)
        self.assertIn("Traceback (most recent call last)", task.error)
        self.assertIn("ValueError: failing at step 2 as scripted", task.error)
        events = await logged(task)
        self.assertEqual(summary(events), [(1, "step"), (2, "error")])
        self.assertEqual(
            fields_of(data_of(events[-1])), {"message": "failing at step 2 as scripted", "type": "ValueError"}
        )

    async def test_created_task_waits_for_start(self):
        async with Node(node_settings()):
            held = await ScriptedTask.objects.acreate(status="created", steps=1)
            # A pending task created after it is done: the runner has looked since.
            marker = await ScriptedTask.objects.acreate(steps=1)
            await wait_status(marker, "completed")
            await held.arefresh_from_db()
            self.assertEqual(held.status, "created")
            self.assertEqual(held.attempts, 0)
            self.assertIsNone(held.started_at)
            self.assertEqual(await logged(held), [])

            self.assertTrue(await held.astart())
            self.assertEqual(held.status, "pending")
            self.assertFalse(await held.astart())  # only a 'created' task starts
            await wait_status(held, "completed")

        self.assertEqual(held.attempts, 1)
        self.assertEqual(summary(await logged(held)), [(1, "step"), (2, "complete")])

    async def test_event_numbers_continue_past_the_reserved_block(self):
        steps = store.SEQ_BLOCK + 100
        async with Node(node_settings()):
            task = await ScriptedTask.objects.acreate(steps=steps)
            await wait_status(task, "completed", timeout=15)

        events = await logged(task)
        self.assertEqual([e.seq for e in events], list(range(1, steps + 2)))
        self.assertEqual(events[-1].type, "complete")
        self.assertGreaterEqual(task.seq_reserved, steps + 1)

    async def test_max_concurrent_tasks_is_respected(self):
        async with Node(node_settings(MAX_CONCURRENT_TASKS=2)) as node:
            active = Counter()
            original = node.runner._execute

            async def tracked(run):
                active["now"] += 1
                active["max"] = max(active["max"], active["now"])
                try:
                    await original(run)
                finally:
                    active["now"] -= 1

            node.runner._execute = tracked
            tasks = [await ScriptedTask.objects.acreate(steps=2, delay=0.05) for _ in range(5)]
            for task in tasks:
                await wait_status(task, "completed")

        self.assertEqual(active["max"], 2)
        self.assertEqual([t.attempts for t in tasks], [1] * 5)


class CancellationTests(RunnerTestCase):
    async def test_cancel_stops_a_running_task(self):
        async with Node(node_settings()) as node:
            task = await ScriptedTask.objects.acreate(steps=200, delay=0.02)
            key = TaskKey.of(ScriptedTask, task.pk)
            await wait_logged(task, lambda ev: len(ev) >= 2, message="two steps")
            run = node.runner.runs[key]

            self.assertEqual(await task.acancel(), "running")
            await wait_status(task, "cancelled")
            await eventually(lambda: run.task.done(), message="the run's coroutine to end")
            self.assertFalse(run.task.cancelled())  # it handled the cancel and finished the row
            self.assertNotIn(key, node.runner.runs)
            at_cancel = summary(await logged(task))

        self.assert_finished_row(task, "cancelled")
        self.assertTrue(task.cancel_requested)
        self.assertIsNone(task.final_value)
        self.assertEqual(task.attempts, 1)
        # The cancelled event ends the log; nothing was sent after it.
        self.assertEqual(summary(await logged(task)), at_cancel)
        seqs = [seq for seq, _ in at_cancel]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
        self.assertEqual(at_cancel[-1][1], "cancelled")
        self.assertEqual({t for _, t in at_cancel[:-1]}, {"step"})
        self.assertLess(len(at_cancel) - 1, 200)
        events = await logged(task)
        self.assertEqual(fields_of(data_of(events[-1])), {"message": "Task cancelled"})

    async def test_cancel_of_created_or_pending_task_never_runs_it(self):
        created = await ScriptedTask.objects.acreate(status="created", steps=3)
        pending = await ScriptedTask.objects.acreate(steps=3)
        self.assertEqual(await created.acancel(), "pending")
        self.assertEqual(await pending.acancel(), "pending")

        async with Node(node_settings()):
            await wait_status(created, "cancelled")
            await wait_status(pending, "cancelled")

        for task in (created, pending):
            with self.subTest(task=str(task)):
                self.assert_finished_row(task, "cancelled")
                self.assertIsNone(task.final_value)
                events = await logged(task)
                self.assertEqual(summary(events), [(1, "cancelled")])  # no step: process() never ran

    async def test_cancel_of_a_waiting_task(self):
        async with Node(node_settings()):
            task = await ContinueTask.objects.acreate(poll_interval=0.05)
            await wait_logged(task, lambda ev: len(ev) >= 1, message="the started event")
            await task.acancel()
            await wait_status(task, "cancelled")

        self.assertEqual(summary(await logged(task)), [(1, "started"), (2, "cancelled")])

    async def test_cancel_of_a_finished_task_changes_nothing(self):
        async with Node(node_settings()):
            task = await ScriptedTask.objects.acreate(steps=1)
            await wait_status(task, "completed")
            self.assertEqual(await task.acancel(), "completed")

        await task.arefresh_from_db()
        self.assertEqual(task.status, "completed")
        self.assertFalse(task.cancel_requested)
        self.assertEqual(summary(await logged(task)), [(1, "step"), (2, "complete")])

    # A cancel (or Node.stop) reaching the coroutine while the result is
    # written must not leave the row running after `complete` went out.
    # Holding the event log's lock stands in for a slow event-log write.
    def test_cancel_arriving_while_the_result_is_written_does_not_strand_the_task(self):
        async_to_sync(self._cancel_while_the_result_is_written)()

    async def _cancel_while_the_result_is_written(self):
        async with Node(node_settings()) as node:
            task = await ScriptedTask.objects.acreate(status="created", steps=1, result={"ok": True})
            key = TaskKey.of(ScriptedTask, task.pk)
            seen = []

            async def watch():
                async for chunk in node.hub.subscribe(key, 0):
                    seen.extend(parse_sse(chunk.decode()))

            watcher = asyncio.create_task(watch())
            # Subscribed and parked on the channel's signal before the task starts.
            await eventually(
                lambda: key in node.hub._channels and any(s.live for s in node.hub._channels[key].subs),
                message="the watcher to wait",
            )
            async with node.eventlog._lock:
                await task.astart()
                # process() returned; the run is writing its result (blocked on the log).
                # (The log's own timer also waits on the lock: a waiter alone
                # does not say that the task was even claimed yet.)
                await eventually(
                    lambda: (
                        key in node.runner.runs
                        and any(e.event == "step" for e in seen)
                        and node.eventlog._lock._waiters
                    ),
                    message="the end to be written",
                )
                run = node.runner.runs[key]
                await task.acancel()
                # The runner delivered the cancel: the run ended, or took it and went on.
                await eventually(
                    lambda: run.cancel_requested and (run.task.done() or run.task.cancelling() == 0),
                    message="the cancel to reach the run",
                )
            await asyncio.wait_for(watcher, 5)
            try:
                await wait_status(task, "completed", "cancelled", timeout=2)
            finally:
                await task.arefresh_from_db()

        self.assertEqual(task.status, "completed")  # what its watchers were told
        self.assertEqual((await logged(task))[-1].type, "complete")


class WaitUntilTests(RunnerTestCase):
    async def test_wait_until_finishes_after_the_row_changes(self):
        async with Node(node_settings()) as node:
            task = await ContinueTask.objects.acreate(poll_interval=0.05)
            await wait_logged(task, lambda ev: len(ev) >= 1, message="the started event")
            await task.arefresh_from_db()
            self.assertEqual(task.status, "running")
            self.assertIn(TaskKey.of(ContinueTask, task.pk), node.runner.runs)

            await ContinueTask.objects.filter(pk=task.pk).aupdate(continue_field=True)
            await wait_status(task, "completed")

        events = await logged(task)
        self.assertEqual(summary(events), [(1, "started"), (2, "final"), (3, "complete")])
        self.assertEqual(fields_of(data_of(events[0]))["continue"], False)
        self.assertEqual(fields_of(data_of(events[1]))["continue"], True)
        self.assertEqual(task.final_value, {"message": "Task completed successfully"})

    async def test_a_save_in_this_process_wakes_wait_until_at_once(self):
        async with Node(node_settings()):
            # Polling alone would take 30 s: the save's signal must wake it.
            task = await ContinueTask.objects.acreate(poll_interval=30)
            await wait_logged(task, lambda ev: len(ev) >= 1, message="the started event")
            task.continue_field = True
            await task.asave(update_fields=["continue_field"])
            await wait_status(task, "completed", timeout=3)

        self.assertEqual([e.type for e in await logged(task)], ["started", "final", "complete"])

    async def test_wait_until_timeout_fails_the_task(self):
        async with Node(node_settings()):
            task = await ContinueTask.objects.acreate(poll_interval=0.05, wait_timeout=0.2)
            await wait_status(task, "failed")

        self.assert_finished_row(task, "failed")
        self.assertIn("TimeoutError", task.error)
        events = await logged(task)
        self.assertEqual(summary(events), [(1, "started"), (2, "error")])
        self.assertEqual(
            fields_of(data_of(events[-1])),
            {"message": "continue_field was not set within 0.2 s", "type": "TimeoutError"},
        )


class SendEventTests(RunnerTestCase):
    async def _run_generator(self, use_async):
        async with Node(node_settings()):
            task = await GeneratorTask.objects.acreate(count=4, use_async=use_async)
            await wait_status(task, "completed")
        events = await logged(task)
        self.assertEqual([e.seq for e in events], [1, 2, 3, 4, 5])
        self.assertEqual([e.type for e in events], ["progress"] * 4 + ["complete"])
        self.assertEqual([fields_of(data_of(e)) for e in events[:4]], [{"i": i} for i in range(4)])
        self.assertEqual(fields_of(data_of(events[-1])), {"result": 4})
        self.assertEqual(task.final_value, 4)

    async def test_send_events_from_async_generator(self):
        await self._run_generator(use_async=True)

    async def test_send_events_from_sync_generator(self):
        await self._run_generator(use_async=False)

    async def test_send_event_outside_a_runner_raises_runtime_error(self):
        unsaved = ScriptedTask()
        saved = await ScriptedTask.objects.acreate(status="created")
        for task in (unsaved, saved):
            with self.subTest(task=str(task)):
                with self.assertRaisesRegex(RuntimeError, "streaming server"):
                    await task.send_event("step", {"x": 1})
                with self.assertRaises(RuntimeError):
                    await task.send_events_from([{"x": 1}])

    async def test_reserved_and_bad_types_raise_value_error_outside_a_runner(self):
        task = ScriptedTask()
        for event_type in [*sorted(RESERVED_TYPES), "bad type", "", "x" * 65, "é", None, 7]:
            with self.subTest(event_type=event_type), self.assertRaises(ValueError):
                await task.send_event(event_type, {})

    async def _probe(self):
        """Run a task whose process() tries reserved and bad types, inside a runner."""

        async def probe(task):
            outcomes = {}
            for event_type in ["complete", "error", "cancelled", "retry", "bad type", "", "x" * 65, "a/b"]:
                try:
                    await task.send_event(event_type, {})
                except Exception as exc:
                    outcomes[event_type] = type(exc).__name__
                else:
                    outcomes[event_type] = "sent"
            returned = await task.send_event("ok.type:1-x_y", {"fine": True})
            return {
                "outcomes": outcomes,
                "returned_type": type(returned).__name__,
                "returned": returned if isinstance(returned, int) else None,
            }

        with mock.patch.object(ScriptedTask, "process", probe):
            async with Node(node_settings()):
                task = await ScriptedTask.objects.acreate()
                await wait_status(task, "completed", "failed")
        return task

    async def test_reserved_and_bad_types_raise_value_error_inside_a_runner(self):
        task = await self._probe()
        self.assertEqual(task.status, "completed", task.error)
        self.assertEqual(
            task.final_value["outcomes"],
            {
                "complete": "ValueError",
                "error": "ValueError",
                "cancelled": "ValueError",
                "retry": "ValueError",
                "bad type": "ValueError",
                "": "ValueError",
                "x" * 65: "ValueError",
                "a/b": "ValueError",
            },
        )
        # Only the valid event went out, then the runner's complete.
        self.assertEqual(summary(await logged(task)), [(1, "ok.type:1-x_y"), (2, "complete")])

    def test_send_event_returns_the_sequence_number(self):
        async_to_sync(self._send_event_returns_the_sequence_number)()

    async def _send_event_returns_the_sequence_number(self):
        task = await self._probe()
        self.assertEqual(task.final_value["returned_type"], "int")
        self.assertEqual(task.final_value["returned"], 1)

    async def test_ephemeral_task_logs_only_its_terminal_event(self):
        async with Node(node_settings()) as node:
            task = await EphemeralTask.objects.acreate(status="created", steps=3, result={"done": 1})
            key = TaskKey.of(EphemeralTask, task.pk)
            live = asyncio.create_task(read_subscription(node, key, 0))
            await asyncio.sleep(0)  # subscribed before the task starts
            await task.astart()
            await wait_status(task, "completed")
            live_events = await asyncio.wait_for(live, 5)

        # A live watcher gets every event ...
        self.assertEqual(
            [(e.id, e.event) for e in live_events], [(1, "step"), (2, "step"), (3, "step"), (4, "complete")]
        )
        # ... the event log keeps the terminal one alone.
        events = await logged(task)
        self.assertEqual(summary(events), [(4, "complete")])
        self.assertEqual(fields_of(data_of(events[0])), {"done": 1})


class RecoveryTests(RunnerTestCase):
    async def test_orphan_with_retry_policy_runs_again(self):
        task = await sync_to_async(make_orphan)(ScriptedTask, DEAD_OWNER, expires_in=60, steps=2)
        async with Node(node_settings()):
            await wait_status(task, "completed")

        self.assert_finished_row(task, "completed")
        self.assertEqual(task.attempts, 2)
        events = await logged(task)
        self.assertEqual(
            summary(events),
            [(1, "step"), (2, "step"), (1001, "retry"), (1002, "step"), (1003, "step"), (1004, "complete")],
        )
        self.assertEqual(
            fields_of(data_of(events[2])),
            {"message": "Running again after an interruption", "attempt": 2, "max_attempts": 3},
        )
        self.assertEqual([data_of(e)["attempt"] for e in events[3:5]], [2, 2])

    async def test_orphan_with_fail_policy_is_failed_not_run(self):
        task = await sync_to_async(make_orphan)(FragileTask, DEAD_OWNER, expires_in=60, steps=2)
        async with Node(node_settings()) as node:
            await wait_status(task, "failed")
            replayed = await read_subscription(node, TaskKey.of(FragileTask, task.pk), 0)

        self.assert_finished_row(task, "failed")
        self.assertEqual(task.attempts, 1)  # not run again
        self.assertEqual(task.error, "Task interrupted: the server running it stopped")
        events = await logged(task)
        self.assertEqual(summary(events), [(1, "step"), (2, "step"), (1001, "error")])
        self.assertEqual(
            fields_of(data_of(events[-1])),
            {"message": "Task interrupted: the server running it stopped", "type": "Interrupted"},
        )
        self.assertEqual([(e.id, e.event) for e in replayed], summary(events))

    async def test_orphan_at_max_attempts_is_failed_not_retried(self):
        task = await sync_to_async(make_orphan)(
            ScriptedTask, DEAD_OWNER, expires_in=60, attempts=ScriptedTask.max_attempts, steps=2
        )
        async with Node(node_settings()):
            await wait_status(task, "failed")

        self.assertEqual(task.attempts, ScriptedTask.max_attempts)
        events = await logged(task)
        self.assertEqual(summary(events), [(1, "step"), (2, "step"), (1001, "error")])
        data = fields_of(data_of(events[-1]))
        self.assertEqual(data["type"], "Interrupted")
        self.assertEqual(data["message"], "Task interrupted on each of its 3 attempts; giving up")

    async def test_orphans_on_another_host_are_judged_by_their_lease(self):
        alive = await sync_to_async(make_orphan)(ScriptedTask, "otherhost:1:x", expires_in=60, steps=1)
        expired = await sync_to_async(make_orphan)(ScriptedTask, "otherhost:1:x", expires_in=-1, steps=1)
        lease_before = alive.lease_expires_at
        async with Node(node_settings()):
            await wait_status(expired, "completed")  # the recovery pass has run
            await alive.arefresh_from_db()

        self.assertEqual(expired.attempts, 2)
        self.assertEqual(
            summary(await logged(expired)),
            [(1, "step"), (2, "step"), (1001, "retry"), (1002, "step"), (1003, "complete")],
        )
        self.assertEqual(alive.status, "running")
        self.assertEqual(alive.lease_owner, "otherhost:1:x")
        self.assertEqual(alive.lease_expires_at, lease_before)
        self.assertEqual(alive.attempts, 1)
        self.assertEqual(summary(await logged(alive)), [(1, "step"), (2, "step")])

    async def test_lost_lease_stops_the_task_without_a_terminal_event(self):
        async with Node(node_settings(LEASE_SECONDS=0.6)) as node:
            task = await ScriptedTask.objects.acreate(steps=500, delay=0.02)
            key = TaskKey.of(ScriptedTask, task.pk)
            await wait_logged(task, lambda ev: len(ev) >= 1, message="a step")
            run = node.runner.runs[key]
            later = timezone.now() + timedelta(seconds=60)
            await ScriptedTask.objects.filter(pk=task.pk).aupdate(
                lease_owner="otherhost:1:x", lease_expires_at=later
            )
            await eventually(lambda: run.task.done(), message="the run to stop")
            self.assertNotIn(key, node.runner.runs)

        await task.arefresh_from_db()
        self.assertEqual(task.status, "running")  # the new owner's to finish
        self.assertEqual(task.lease_owner, "otherhost:1:x")
        self.assertNotIn("complete", [e.type for e in await logged(task)])
        self.assertNotIn("error", [e.type for e in await logged(task)])


class TwoNodeTests(RunnerTestCase):
    def test_two_nodes_never_run_a_task_at_once(self):
        """Two nodes, each in its own thread, loop and database connection."""
        tasks = [ScriptedTask.objects.create(steps=3, delay=0.01) for _ in range(20)]
        ran = []  # (owner, key) for each run started
        errors = []
        barrier = threading.Barrier(2)
        done = threading.Event()

        async def serve():
            node = Node(node_settings(MAX_CONCURRENT_TASKS=4))
            runner = node.runner
            original = runner._execute

            async def tracked(run):
                ran.append((runner.owner, run.key))
                await original(run)

            runner._execute = tracked
            await asyncio.to_thread(barrier.wait, 10)
            async with node:
                await asyncio.to_thread(done.wait, 30)

        def thread_main():
            try:
                async_to_sync(serve)()
            except BaseException as exc:
                errors.append(exc)
            finally:
                connections.close_all()

        threads = [threading.Thread(target=thread_main) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 20
            while ScriptedTask.objects.exclude(status="completed").exists():
                self.assertFalse(errors, errors)
                self.assertLess(time.monotonic(), deadline, "tasks did not all complete")
                time.sleep(0.05)
        finally:
            done.set()
            for thread in threads:
                thread.join(15)
        self.assertFalse(any(t.is_alive() for t in threads))
        self.assertEqual(errors, [])
        self.assertIsNone(current_node())

        runs = Counter(key for _, key in ran)
        self.assertEqual(len(runs), 20)
        self.assertEqual(set(runs.values()), {1})  # exactly one node ran each task
        self.assertEqual(len({owner for owner, _ in ran}), 2)  # both took part
        for task in tasks:
            task.refresh_from_db()
            self.assertEqual(task.attempts, 1)
            events = logged_sync(task)
            self.assertEqual(summary(events), [(1, "step"), (2, "step"), (3, "step"), (4, "complete")])
            self.assertEqual({data_of(e)["attempt"] for e in events[:3]}, {1})


class ShutdownTests(RunnerTestCase):
    async def test_stop_puts_a_retry_task_back_to_pending(self):
        async with Node(node_settings()) as node:
            task = await ScriptedTask.objects.acreate(steps=2, delay=30)
            await wait_logged(task, lambda ev: len(ev) >= 1, message="a step")
            await node.stop()
            self.assertEqual(node.runner.runs, {})

        await task.arefresh_from_db()
        self.assertEqual(task.status, "pending")
        self.assertEqual(task.attempts, 1)
        self.assertIsNone(task.lease_owner)
        self.assertIsNone(task.lease_expires_at)
        self.assertIsNone(task.completed_at)
        self.assertEqual(task.error, "")
        self.assertEqual(summary(await logged(task)), [(1, "step")])

        # The next server runs it again, numbering events past the old ones.
        await ScriptedTask.objects.filter(pk=task.pk).aupdate(delay=0)
        async with Node(node_settings()):
            await wait_status(task, "completed")
        self.assertEqual(task.attempts, 2)
        self.assertEqual(
            summary(await logged(task)),
            [(1, "step"), (1001, "retry"), (1002, "step"), (1003, "step"), (1004, "complete")],
        )

    async def test_stop_fails_a_fail_policy_task(self):
        async with Node(node_settings()) as node:
            task = await FragileTask.objects.acreate(steps=2, delay=30)
            await wait_logged(task, lambda ev: len(ev) >= 1, message="a step")
            await node.stop()

        await task.arefresh_from_db()
        self.assert_finished_row(task, "failed")
        self.assertEqual(task.attempts, 1)
        self.assertEqual(task.error, "Task interrupted: the server shut down")
        events = await logged(task)
        self.assertEqual(summary(events), [(1, "step"), (2, "error")])
        self.assertEqual(
            fields_of(data_of(events[-1])),
            {"message": "Task interrupted: the server shut down", "type": "Interrupted"},
        )

    async def test_stop_fails_a_retry_task_on_its_last_attempt(self):
        async with Node(node_settings()) as node:
            task = await ScriptedTask.objects.acreate(
                steps=2, delay=30, attempts=ScriptedTask.max_attempts - 1
            )
            await wait_logged(task, lambda ev: len(ev) >= 2, message="retry and a step")
            await node.stop()

        await task.arefresh_from_db()
        self.assertEqual(task.status, "failed")
        self.assertEqual(task.attempts, ScriptedTask.max_attempts)
        events = await logged(task)
        self.assertEqual(summary(events), [(1, "retry"), (2, "step"), (3, "error")])
        self.assertEqual(fields_of(data_of(events[-1]))["type"], "Interrupted")

    async def test_shutdown_grace_lets_a_task_finish(self):
        async with Node(node_settings(SHUTDOWN_GRACE=5.0)) as node:
            task = await FragileTask.objects.acreate(steps=3, delay=0.1)
            await wait_logged(task, lambda ev: len(ev) >= 1, message="a step")
            await node.stop()

        await task.arefresh_from_db()
        self.assertEqual(task.status, "completed")
        self.assertEqual([e.type for e in await logged(task)], ["step", "step", "step", "complete"])


class RobustnessTests(RunnerTestCase):
    """Failures in the runner's own machinery (found in review) do not strand tasks."""

    async def test_a_failed_finish_is_retried_until_the_task_ends(self):
        real_finish = store.finish
        calls = []

        def failing_once(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("database went away")
            return real_finish(*args, **kwargs)

        with mock.patch.object(store, "finish", failing_once):
            async with Node(node_settings()) as node:
                task = await ScriptedTask.objects.acreate(steps=2)
                await wait_status(task, "completed", timeout=10)
                events = await read_subscription(node, TaskKey.of(ScriptedTask, task.pk), 0)
        self.assertGreaterEqual(len(calls), 2)
        self.assertEqual([e.event for e in events], ["step", "step", "complete"])
        self.assertEqual(summary(await logged(task))[-1], (3, "complete"))

    async def test_a_cancelled_error_from_inside_process_fails_the_task(self):
        async def cancelled_inside(self):
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future

        with mock.patch.object(ScriptedTask, "process", cancelled_inside):
            async with Node(node_settings()):
                task = await ScriptedTask.objects.acreate(steps=1)
                await wait_status(task, "failed")
        self.assertEqual((await logged(task))[-1].type, "error")
        self.assertIn("CancelledError", task.error)

    async def test_stopping_during_a_claim_leaves_no_task_running_unowned(self):
        real_claim = store.claim_pending
        claiming = threading.Event()

        def slow_claim(*args, **kwargs):
            claiming.set()
            time.sleep(0.3)  # the stop arrives while this is in the database
            return real_claim(*args, **kwargs)

        task = await ScriptedTask.objects.acreate(steps=50, delay=0.1)
        with mock.patch.object(store, "claim_pending", slow_claim):
            node = Node(node_settings())
            await node.start()
            await eventually(claiming.is_set, message="a claim in flight")
            await node.stop()
        await task.arefresh_from_db()
        # Claimed, then handed back by the stop (retry policy), not left running.
        self.assertEqual(task.status, "pending")
        self.assertIsNone(task.lease_owner)

    async def test_a_claim_failing_partway_runs_the_rows_it_took(self):
        # SQLite claims row by row, each in its own transaction (PostgreSQL: one
        # transaction, all or nothing): rows committed before a failure must run,
        # not sit "running" with no run until recovery fails them.
        real_take = store._take
        calls = []

        def failing_second(*args, **kwargs):
            calls.append(args[1])
            if len(calls) == 2:
                raise RuntimeError("database went away")
            return real_take(*args, **kwargs)

        tasks = [await ScriptedTask.objects.acreate(steps=1) for _ in range(3)]
        with mock.patch.object(store, "_take", failing_second):
            async with Node(node_settings()):
                for task in tasks:
                    await wait_status(task, "completed", timeout=10)
        self.assertGreaterEqual(len(calls), 4, "the failed row was claimed again at the next step")
        for task in tasks:
            self.assertEqual(task.attempts, 1)

    async def test_a_cancelled_flush_keeps_the_events_it_did_not_write(self):
        async with Node(node_settings(EVENT_BATCH_SIZE=100, EVENT_FLUSH_INTERVAL=60)) as node:
            log = node.eventlog
            for seq in range(1, 301):
                payload = build_payload({"n": seq}, task_id=1, model_name="ScriptedTask")
                # Straight into the queue: append() would wake the writer at 100.
                log._pending.append(
                    (TaskKey("testapp.scriptedtask", "424242"), Event(seq, "step", payload), None)
                )
            real_write = store.write_events

            def slow_write(rows):
                time.sleep(0.2)
                real_write(rows)

            with mock.patch.object(store, "write_events", slow_write):
                flushing = asyncio.ensure_future(log.flush())
                await asyncio.sleep(0.05)
                flushing.cancel()
                await asyncio.gather(flushing, return_exceptions=True)
            await log.flush()
        count = await TaskEvent.objects.filter(task_id="424242").acount()
        self.assertEqual(count, 300)


class ClaimFailureTests(TransactionTestCase):
    """store.claim_pending when the database fails partway, on both paths (PostgreSQL:
    one transaction per model; SQLite: one per row). Claims committed before the
    failure are returned (the runner runs them); one whose transaction did not
    commit never is. Called directly: no runner touches the rows after."""

    OWNER = "node-a"

    def claim(self):
        return store.claim_pending([ScriptedTask, GeneratorTask], 10, self.OWNER, 60)

    def assert_returned_is_what_is_held(self, claims):
        """Every row now running under OWNER is a returned claim, and the other way round."""
        returned = {(type(c.instance), c.instance.pk) for c in claims}
        held = {
            (model, pk)
            for model in (ScriptedTask, GeneratorTask)
            for pk in model.objects.filter(status="running", lease_owner=self.OWNER).values_list(
                "pk", flat=True
            )
        }
        self.assertEqual(returned, held)

    def test_an_error_on_a_later_model_returns_the_claims_already_committed(self):
        first = ScriptedTask.objects.create(steps=1)
        second = GeneratorTask.objects.create()
        locked = OperationalError("database is locked")
        with (
            mock.patch.object(GeneratorTask, "claimable", side_effect=locked),
            self.assertLogs("streaming.tasks.store", "ERROR") as logs,
        ):
            claims = self.claim()
        self.assertEqual([(type(c.instance), c.instance.pk) for c in claims], [(ScriptedTask, first.pk)])
        first.refresh_from_db()
        self.assertEqual((first.status, first.lease_owner), ("running", self.OWNER))
        second.refresh_from_db()
        self.assertEqual((second.status, second.lease_owner), ("pending", None))
        self.assertEqual(len(logs.records), 1)
        self.assertIn("Claiming GeneratorTask failed; running the 1 claimed", logs.output[0])
        self.assert_returned_is_what_is_held(claims)

    def test_nothing_claimed_yet_the_error_is_raised(self):
        ScriptedTask.objects.create(steps=1)
        locked = OperationalError("database is locked")
        with (
            mock.patch.object(ScriptedTask, "claimable", side_effect=locked),
            self.assertRaisesMessage(OperationalError, "database is locked"),
        ):
            self.claim()  # the runner logs its failed step and tries again

    def test_a_claim_whose_commit_fails_is_not_returned(self):
        # Each model here has one row, so the second commit is GeneratorTask's
        # on both paths: its update ran, and was rolled back.
        first = ScriptedTask.objects.create(steps=1)
        second = GeneratorTask.objects.create()
        default = connections["default"]
        real_commit = default.commit
        commits = []

        def failing_second(*args, **kwargs):
            commits.append(1)
            if len(commits) == 2:
                raise DatabaseError("could not serialize access")
            return real_commit(*args, **kwargs)

        with (
            mock.patch.object(default, "commit", failing_second),
            self.assertLogs("streaming.tasks.store", "ERROR"),
        ):
            claims = self.claim()
        self.assertEqual(len(commits), 2)
        self.assertEqual([(type(c.instance), c.instance.pk) for c in claims], [(ScriptedTask, first.pk)])
        second.refresh_from_db()
        self.assertEqual((second.status, second.lease_owner, second.attempts), ("pending", None, 0))
        self.assert_returned_is_what_is_held(claims)

    def test_an_error_after_a_take_returns_only_committed_rows(self):
        # The second model has two rows and fails on its second: PostgreSQL rolls
        # back its first as well (one transaction), SQLite committed it (its own).
        ScriptedTask.objects.create(steps=1)
        GeneratorTask.objects.create()
        GeneratorTask.objects.create()
        real_take = store._take
        taken = []

        def failing_second_generator(model, pk, *args):
            taken.append((model, pk))
            if model is GeneratorTask and len([m for m, _ in taken if m is GeneratorTask]) == 2:
                raise OperationalError("server closed the connection unexpectedly")
            return real_take(model, pk, *args)

        with (
            mock.patch.object(store, "_take", failing_second_generator),
            self.assertLogs("streaming.tasks.store", "ERROR"),
        ):
            claims = self.claim()
        on_postgresql = connection.features.has_select_for_update_skip_locked
        self.assertEqual(len(claims), 1 if on_postgresql else 2)
        self.assert_returned_is_what_is_held(claims)
        self.assertEqual(GeneratorTask.objects.filter(status="pending").count(), 2 if on_postgresql else 1)
