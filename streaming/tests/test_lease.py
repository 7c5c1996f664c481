"""A run that cannot prove its lease stops, and what it wrote late is fenced out.

In process (a real Node in the test's loop, the suite's database). The
multi-node stall and partition tests with real servers are in
test_fencing.py.
"""

import asyncio
import math
import time
from datetime import timedelta
from unittest import mock

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError
from django.test import SimpleTestCase
from django.utils import timezone

from streaming import LeaseLost
from streaming.conf import get_settings, lease_margin
from streaming.events import Event, build_payload
from streaming.keys import TaskKey
from streaming.models import StreamTask
from streaming.node import Node
from streaming.tasks import store
from streaming.tests.support import eventually, node_settings, serving
from streaming.tests.support import raw_request as request
from streaming.tests.test_runner import (
    DEAD_OWNER,
    RunnerTestCase,
    logged,
    make_orphan,
    read_subscription,
    wait_logged,
    wait_status,
)
from streaming.tests.testapp.models import EphemeralTask, FragileTask, ScriptedTask


def published_at(node) -> list[tuple[float, int]]:
    """Record (monotonic time, seq) of everything the node's hub publishes."""
    times: list[tuple[float, int]] = []
    real = node.hub.publish

    async def publish(key, event):
        times.append((time.monotonic(), event.seq))
        await real(key, event)

    node.hub.publish = publish
    return times


class StalledRenewalTests(RunnerTestCase):
    async def test_a_run_whose_renewals_hang_stops_at_its_deadline_and_sends_nothing_after(self):
        settings = node_settings(LEASE_SECONDS=1.5, LEASE_MARGIN=0.5, POLL_INTERVAL=0.05)
        async with Node(settings) as node:
            times = published_at(node)
            task = await FragileTask.objects.acreate(steps=1000, delay=0.02)
            key = TaskKey.of(task)
            await wait_logged(task, lambda events: len(events) >= 2, message="steps")
            run = node.runner.runs[key]

            def renewals_hang(*args, **kwargs):
                # The database stops answering (a partition): the renewal comes back too late.
                time.sleep(2.5)
                return []

            with mock.patch.object(store, "renew_leases", renewals_hang):
                await eventually(lambda: run.task.done(), timeout=5, message="the run to stop itself")
                self.assertTrue(run.lease_lost)
                deadline = run.deadline
                self.assertLess(deadline, time.monotonic())
                # Nothing left this node after the deadline.
                self.assertTrue(times)
                self.assertLess(max(at for at, _seq in times), deadline)
        # No end from the run itself: once its lease has expired the task is
        # recovered by its policy (here, by this very node: FAIL, Interrupted).
        events = await logged(task)
        types = [e.type for e in events]
        self.assertEqual(set(types[:-1]), {"step"})
        if types[-1] == "error":
            self.assertIn('"type": "Interrupted"', events[-1].payload)

    async def test_the_deadline_moves_with_each_renewal(self):
        # Renewed every second, each proving 2.5 s: a renewal may come 1.5 s
        # late (two suites side by side on a loaded CI machine) before the run
        # stops. 0.9 s leases lost one there once, and the test with it.
        settings = node_settings(LEASE_SECONDS=3, LEASE_MARGIN=0.5)
        async with Node(settings) as node:
            task = await ScriptedTask.objects.acreate(steps=80, delay=0.05)  # 4 s: several renewals
            key = TaskKey.of(task)
            await eventually(lambda: key in node.runner.runs, message="the run")
            first = node.runner.runs[key].deadline
            self.assertLess(first, math.inf)
            await eventually(
                lambda: key in node.runner.runs and node.runner.runs[key].deadline > first,
                message="a renewal to move the deadline on",
            )
            await wait_status(task, "completed", timeout=10)
        events = await logged(task)
        self.assertEqual([e.seq for e in events], list(range(1, 82)))  # 80 steps + complete: never stopped


class ResumedPastItsDeadlineTests(RunnerTestCase):
    async def test_a_process_that_wakes_past_its_deadline_sends_nothing(self):
        async with Node(node_settings(LEASE_SECONDS=30)) as node:
            times = published_at(node)
            task = await FragileTask.objects.acreate(steps=1000, delay=0.05)
            key = TaskKey.of(task)
            await wait_logged(task, lambda events: len(events) >= 1, message="a step")
            run = node.runner.runs[key]
            sent = len(times)
            # As if the process had been stopped (SIGSTOP, a frozen VM) past its
            # deadline: the clock jumps, the watchdog has not run yet.
            run._watchdog.cancel()
            run.deadline = time.monotonic() - 1
            await eventually(lambda: run.task.done(), message="the run to stop at its next event")
            self.assertEqual(len(times), sent)  # not one event more
            self.assertTrue(run.lease_lost)


class FencedLogTests(RunnerTestCase):
    def event(self, task, seq):
        payload = build_payload({"step": seq}, task_id=task.pk, model_name="FragileTask")
        return Event(seq, "step", payload)

    def test_the_log_takes_a_runs_events_only_while_the_row_is_that_runs(self):
        now = timezone.now()
        task = FragileTask.objects.create(
            status="running", lease_owner="me", attempts=2, lease_expires_at=now + timedelta(seconds=9)
        )
        key = TaskKey.of(task)
        current = store.Fence(FragileTask, task.pk, "me", 2)
        stale_attempt = store.Fence(FragileTask, task.pk, "me", 1)
        other_owner = store.Fence(FragileTask, task.pk, "someone-else", 2)
        dropped = store.write_log(
            [
                (key, self.event(task, 1), current),
                (key, self.event(task, 2), stale_attempt),
                (key, self.event(task, 3), other_owner),
                (key, self.event(task, 4), None),  # unfenced: always written
            ]
        )
        self.assertEqual([event.seq for _key, event, _fence in dropped], [2, 3])
        seqs = sorted(store.read_events(key, 0, 10), key=lambda e: e.seq)
        self.assertEqual([e.seq for e in seqs], [1, 4])
        # Once the run is over (or the row taken), its late events are refused too.
        FragileTask.objects.filter(pk=task.pk).update(status="failed", lease_owner=None)
        self.assertEqual(len(store.write_log([(key, self.event(task, 5), current)])), 1)

    async def test_events_flushed_after_a_takeover_are_not_logged(self):
        async with Node(node_settings(EVENT_FLUSH_INTERVAL=60)) as node:
            task = await FragileTask.objects.acreate(steps=1000, delay=0.05)
            key = TaskKey.of(task)
            await eventually(lambda: key in node.runner.runs, message="the run")
            run = node.runner.runs[key]
            await eventually(lambda: len(node.eventlog._pending) >= 2, message="events queued for the log")
            # Another node takes the task over before this one writes its log.
            await FragileTask.objects.filter(pk=task.pk).aupdate(
                lease_owner="otherhost:1:x", lease_expires_at=timezone.now() + timedelta(seconds=60)
            )
            with self.assertLogs("streaming.tasks.eventlog", "WARNING") as logs:
                await node.eventlog.flush()
            self.assertIn(f"attempt {run.attempt} no longer holds the task", logs.output[0])
            self.assertEqual(await logged(task), [])

    def test_finish_is_fenced_by_attempt(self):
        task = FragileTask.objects.create(status="running", lease_owner="me", attempts=2)
        self.assertFalse(store.finish(FragileTask, task.pk, "me", "completed", None, attempt=1))
        self.assertTrue(store.finish(FragileTask, task.pk, "me", "completed", None, attempt=2))


seen_by_process: list[tuple[str, float]] = []


async def process_checking_its_lease(self):
    """A process() that proves its lease before each side effect, and records what it saw."""
    seen_by_process.append(("attempt", self.attempt))
    for step in range(1, 200):
        left = await self.check_lease()
        seen_by_process.append(("left", left))
        await self.send_event("step", {"step": step})
        await asyncio.sleep(0.02)


class CheckLeaseTests(RunnerTestCase):
    async def test_check_lease_renews_and_refuses_once_another_node_holds_the_task(self):
        seen_by_process.clear()
        with mock.patch.object(FragileTask, "process", process_checking_its_lease):
            async with Node(node_settings(LEASE_SECONDS=30, LEASE_MARGIN=6)) as node:
                task = await FragileTask.objects.acreate(steps=1)
                key = TaskKey.of(task)
                await wait_logged(task, lambda events: len(events) >= 3, message="steps")
                run = node.runner.runs[key]
                await FragileTask.objects.filter(pk=task.pk).aupdate(lease_owner="otherhost:1:x")
                await eventually(lambda: run.task.done(), message="the run to stop")
        self.assertEqual(seen_by_process[0], ("attempt", 1))
        lefts = [left for what, left in seen_by_process if what == "left"]
        self.assertTrue(all(20 < left <= 24 for left in lefts), lefts)  # LEASE_SECONDS - LEASE_MARGIN
        self.assertTrue(run.lease_lost)
        types = [e.type for e in await logged(task)]
        self.assertEqual(set(types), {"step"})  # no end from a run that lost the task

    async def test_lease_lost_is_not_swallowed_by_except_exception(self):
        self.assertTrue(issubclass(LeaseLost, asyncio.CancelledError))
        self.assertFalse(issubclass(LeaseLost, Exception))


class LeaseMarginSettingTests(SimpleTestCase):
    def test_default_and_bounds(self):
        self.assertEqual(lease_margin(node_settings(LEASE_SECONDS=15, LEASE_MARGIN=None)), 3)
        self.assertEqual(lease_margin(node_settings(LEASE_SECONDS=15, LEASE_MARGIN=4)), 4)
        for bad in (-1, 10, 12):
            with self.subTest(margin=bad), self.assertRaisesMessage(ImproperlyConfigured, "LEASE_MARGIN"):
                lease_margin(node_settings(LEASE_SECONDS=15, LEASE_MARGIN=bad))

    def test_attempt_outside_a_run_says_where_it_works(self):
        with self.assertRaisesMessage(RuntimeError, "only while a streaming server runs"):
            StreamTask.attempt.fget(FragileTask())


class ReadinessTests(RunnerTestCase):
    """/ready says whether the node can reach its database (and broker); /health only that it lives."""

    async def get(self, port, path):
        head, reader, writer = await request(port, path, "connection: close\r\n")
        body = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return int(head.split(" ", 2)[1]), body.decode()

    async def test_ready_when_the_database_answers_not_when_it_fails_or_hangs(self):
        async with serving(READY_TIMEOUT=0.3) as (_app, port):
            self.assertEqual(await self.get(port, "/ready"), (200, "READY"))

            def refused():
                raise OperationalError("connection refused")

            with mock.patch("streaming.node._ping_database", refused):
                self.assertEqual(
                    await self.get(port, "/ready"), (503, "Not ready: database: OperationalError\n")
                )
                self.assertEqual(await self.get(port, "/health"), (200, "OK"))

            with mock.patch("streaming.node._ping_database", lambda: time.sleep(1)):
                status, body = await self.get(port, "/ready")
                self.assertEqual((status, body), (503, "Not ready: database: no answer within 0.3 s\n"))
            await asyncio.sleep(1)  # the hung check's thread is free again
            self.assertEqual(await self.get(port, "/ready"), (200, "READY"))

    async def test_probes_arriving_together_share_one_check(self):
        calls = []

        def ping():
            calls.append(1)
            time.sleep(0.1)

        async with serving() as (_app, port):
            with mock.patch("streaming.node._ping_database", ping):
                answers = await asyncio.gather(*(self.get(port, "/ready") for _ in range(20)))
        self.assertEqual(set(answers), {(200, "READY")})
        self.assertLess(len(calls), 5)


class RedisDownTests(RunnerTestCase):
    """With Redis unreachable, a finished task's stream still opens: its history is in the database."""

    async def test_a_finished_tasks_stream_opens_from_the_log_while_redis_is_down(self):
        url = get_settings().BROKER_URL or ""
        if not url.startswith("redis"):
            self.skipTest("needs the Redis broker (the suite's PostgreSQL + Redis pass)")
        from redis.exceptions import ConnectionError as RedisConnectionError

        task = await FragileTask.objects.acreate(status="completed", attempts=1)
        key = TaskKey.of(task)
        events = [
            Event(seq, "step", build_payload({"step": seq}, task_id=task.pk, model_name="x"))
            for seq in (1, 2)
        ]
        events.append(Event(3, "complete", build_payload({}, task_id=task.pk, model_name="x")))
        await sync_to_async(store.write_events)([(key, event) for event in events])

        async with Node(node_settings(BROKER_URL=url, RUN_TASKS=False)) as node:
            down = mock.AsyncMock(side_effect=RedisConnectionError("Connection refused"))
            with (
                mock.patch.object(node.transport.redis, "xrange", down),
                mock.patch.object(node.transport.redis, "xrevrange", down),
                self.assertLogs("streaming.transports.redis", "WARNING") as logs,
            ):
                received = await read_subscription(node, key, 0)
        self.assertEqual([(e.id, e.event) for e in received], [(1, "step"), (2, "step"), (3, "complete")])
        self.assertTrue(down.await_count)
        self.assertEqual(len(logs.output), 1, logs.output)  # one line, no traceback per request
        self.assertIn("Redis unreachable", logs.output[0])


class SalvageTests(RunnerTestCase):
    """A dead run's events that reached Redis but not the log are logged before its task is settled."""

    async def test_recovery_logs_what_the_dead_run_published_but_never_wrote(self):
        url = get_settings().BROKER_URL or ""
        if not url.startswith("redis"):
            self.skipTest("needs the Redis broker (the suite's PostgreSQL + Redis pass)")
        from redis import asyncio as aioredis

        from streaming.transports.redis import stream_name

        orphan = await sync_to_async(make_orphan)(FragileTask, DEAD_OWNER, expires_in=-5, logged_steps=2)
        key = TaskKey.of(orphan)
        client = aioredis.Redis.from_url(url)
        try:
            await client.delete(stream_name(key))
            for seq in (1, 2, 3, 4):  # 3 and 4 went out live; the run died before writing them
                payload = build_payload(
                    {"step": seq, "attempt": 1}, task_id=orphan.pk, model_name="FragileTask"
                )
                await client.xadd(stream_name(key), {"t": "step", "p": payload}, id=f"{seq}-0")
            async with Node(node_settings(BROKER_URL=url)):
                await wait_status(orphan, "failed")
        finally:
            await client.delete(stream_name(key))
            await client.aclose()
        self.assertEqual(
            [(e.seq, e.type) for e in await logged(orphan)],
            [(1, "step"), (2, "step"), (3, "step"), (4, "step"), (1001, "error")],
        )

    async def redis_or_skip(self):
        url = get_settings().BROKER_URL or ""
        if not url.startswith("redis"):
            self.skipTest("needs the Redis broker (the suite's PostgreSQL + Redis pass)")
        return url

    async def test_with_redis_down_the_task_waits_until_its_events_can_be_salvaged(self):
        url = await self.redis_or_skip()
        from redis.exceptions import ConnectionError as RedisConnectionError

        orphan = await sync_to_async(make_orphan)(FragileTask, DEAD_OWNER, expires_in=-5, logged_steps=2)
        async with Node(node_settings(BROKER_URL=url, LEASE_SECONDS=0.9)) as node:
            down = mock.AsyncMock(side_effect=RedisConnectionError("Connection refused"))
            with mock.patch.object(node.transport, "sent_after", down):
                await eventually(lambda: down.await_count >= 2, message="two recovery looks")
                await orphan.arefresh_from_db()
                self.assertEqual(orphan.status, "running")  # not settled without what Redis holds
            await wait_status(orphan, "failed")  # Redis back: salvaged, then settled
        self.assertEqual([e.type for e in await logged(orphan)], ["step", "step", "error"])

    async def test_a_model_that_keeps_no_log_gets_none_from_a_salvage(self):
        url = await self.redis_or_skip()
        from redis import asyncio as aioredis

        from streaming.transports.redis import stream_name

        orphan = await sync_to_async(make_orphan)(EphemeralTask, DEAD_OWNER, expires_in=-5, logged_steps=0)
        key = TaskKey.of(orphan)
        client = aioredis.Redis.from_url(url)
        try:
            payload = build_payload({"step": 1}, task_id=orphan.pk, model_name="EphemeralTask")
            await client.xadd(stream_name(key), {"t": "step", "p": payload}, id="1-0")
            async with Node(node_settings(BROKER_URL=url)):
                await wait_status(orphan, "completed")  # RETRY: requeued, then run again
        finally:
            await client.delete(stream_name(key))
            await client.aclose()
        self.assertNotIn(1, [e.seq for e in await logged(orphan)])
