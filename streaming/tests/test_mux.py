"""The multiplexed stream: several tasks (and model feeds) on one connection.

In process against the hub (fanout/mux.py), then end to end against a real
server: ``GET /stream/?task=<Model>/<id>[@<after>]&feed=<Model>``.
"""

import asyncio
import random
import threading
import time
from unittest import mock

import httpx
import redis
from django.contrib.auth.models import Permission, User
from django.test import TestCase

from streaming import access
from streaming.conf import get_settings
from streaming.events import KEEPALIVE, retry_hint
from streaming.fanout.hub import RECONNECT_HINT_MS, RunningTask
from streaming.fanout.mux import Mux
from streaming.fanout.sinks import QueueSink
from streaming.keys import TaskKey
from streaming.tests.testapp.models import OwnedTask, PrivateTask, ScriptedTask
from streaming.transports.redis import started_channel
from streaming.web.app import MAX_MUX_TASKS

from .servercase import ServerTestCase
from .support import SSE, ServerProcess, eventually, parse_sse, wait_for
from .tcpproxy import TcpProxy
from .test_access import HOSTS_SETTINGS, UVICORN, AccessCase
from .test_broker import WAIT, BrokerTestCase, ev
from .test_distributed import DistributedTestCase

A = TaskKey("testapp.scriptedtask", "1")
B = TaskKey("testapp.scriptedtask", "2")
C = TaskKey("testapp.privatetask", "7")


async def live(mux: Mux) -> None:
    """Until every task of ``mux`` is past its start (caught up: written to live)."""
    await eventually(
        lambda: all(view.subscriber is not None and view.subscriber.live for view in mux.views.values()),
        message="the mux's subscribers to be live",
    )


def by_task(chunks: list[bytes]) -> dict[str, list[int]]:
    """The seqs each task's events arrived with, in arrival order."""
    seen: dict[str, list[int]] = {}
    for message in parse_sse(b"".join(chunks).decode()):
        seen.setdefault(message.data["task"], []).append(message.id)
    return seen


class MuxHubTests(BrokerTestCase):
    """fanout/mux.py over the hub, with a fake event log: no database, no sockets."""

    def open(self, *targets, feeds=frozenset(), ends_in=None) -> tuple[Mux, QueueSink]:
        sink = QueueSink()
        mux = Mux(self.broker, sink, feeds=frozenset(feeds), ends_in=ends_in)
        self.broker.follow(mux)
        for key, after in targets:
            mux.add(key, after)
        return mux, sink

    async def consume(self, sink: QueueSink, *, pause: float = 0.0) -> list[bytes]:
        chunks = []
        async with asyncio.timeout(WAIT):
            async for chunk in sink.consume():
                chunks.append(chunk)
                if pause:
                    await asyncio.sleep(pause)
        return chunks

    async def test_two_tasks_share_one_sink_each_in_order_and_it_ends_after_both(self):
        self.make()
        await self.publish(ev(1, task="a"), key=A)
        mux, sink = self.open((A, None), (B, None))
        reading = asyncio.create_task(self.consume(sink))
        await live(mux)  # both joined: A at its latest event, B waiting for its first
        for seq in range(2, 6):
            await self.publish(ev(seq, task="a"), key=A)
            await self.publish(ev(seq + 100, task="b"), key=B)
            await asyncio.sleep(0)
        await self.publish(ev(6, "complete", task="a"), key=A)
        await asyncio.sleep(0.01)
        self.assertFalse(reading.done(), "one task's end does not end the others'")
        await self.publish(ev(106, "complete", task="b"), key=B)
        seen = by_task(await reading)
        self.assertEqual(seen["a"], [1, 2, 3, 4, 5, 6])  # the latest event first, then the rest
        self.assertEqual(seen["b"], [102, 103, 104, 105, 106])  # (no seq 1..101 there: a gap is fine)
        self.assertTrue(mux.closed)
        self.assertEqual(self.broker._channels, {}, "every subscriber detached")

    async def test_a_consumer_that_reads_slowly_gets_every_event_of_every_task_once(self):
        self.make(history_size=20, max_chunk=300)  # memory holds little: catch-ups read the log
        _mux, sink = self.open((A, 0), (B, 0), (C, 0))
        reading = asyncio.create_task(self.consume(sink, pause=0.001))
        for seq in range(1, 200):
            for key, name in ((A, "a"), (B, "b"), (C, "c")):
                await self.publish(ev(seq, task=name), key=key)
            if seq % 10 == 0:
                await asyncio.sleep(0)
        for key, name in ((A, "a"), (B, "b"), (C, "c")):
            await self.publish(ev(200, "complete", task=name), key=key)
        seen = by_task(await reading)
        for name in "abc":
            self.assertEqual(seen[name], list(range(1, 201)), name)

    async def test_a_client_that_reads_nothing_holds_one_chunk_whatever_the_number_of_tasks(self):
        self.make(history_size=20, max_chunk=400)  # catch-ups read the log, a chunk at a time
        keys = [TaskKey("testapp.scriptedtask", str(n)) for n in range(1, 31)]
        for key in keys:
            await self.publish(*(ev(seq, task=key.pk) for seq in range(1, 100)), key=key)
            await self.publish(ev(100, "complete", task=key.pk), key=key)
        _mux, sink = self.open(*((key, 0) for key in keys))
        await eventually(lambda: sink.chunks, message="a first chunk")
        for _ in range(20):
            await asyncio.sleep(0.005)  # every catch-up has had its turn
        self.assertEqual(len(sink.chunks), 1, "one chunk waits, not one per task")
        seen = by_task(await self.consume(sink))
        self.assertEqual(seen, {key.pk: list(range(1, 101)) for key in keys})  # then all of it, once

    async def test_a_cursor_at_a_tasks_end_counts_as_ended(self):
        self.make()
        await self.publish(ev(1, task="a"), ev(2, "complete", task="a"), key=A)
        mux, sink = self.open((A, 2), (B, 0))
        reading = asyncio.create_task(self.consume(sink))
        await asyncio.sleep(0.01)
        self.assertFalse(mux.closed, "a task already ended for this client does not end the stream")
        await self.publish(ev(1, "complete", task="b"), key=B)
        self.assertEqual(by_task(await reading), {"b": [1]})

    async def test_a_feed_streams_each_announced_task_and_stays_open(self):
        self.make(keepalive=0.05)
        mux, sink = self.open(feeds={A.label})
        chunks: list[bytes] = []

        async def read():
            async for chunk in sink.consume():
                chunks.append(chunk)

        reading = asyncio.create_task(read())
        await eventually(lambda: KEEPALIVE in chunks, message="a keep-alive on an idle feed")
        self.broker.started([(A, 0), (TaskKey("testapp.privatetask", "1"), 0)])  # another model's: not ours
        await self.publish(ev(1, task="a"), ev(2, "complete", task="a"), key=A)
        await self.publish(ev(1, task="other"), key=TaskKey("testapp.privatetask", "1"))
        await asyncio.sleep(0.01)
        self.broker.announced([(A, 0)])  # a late echo (Redis gives a node its own announcements back)
        self.broker.started([(B, 4)])
        await self.publish(ev(5, task="b"), key=B)
        await eventually(lambda: "b" in by_task(chunks), message="the second task")
        await asyncio.sleep(0.01)  # (time for a duplicate to show, if the echo made one)
        self.assertFalse(mux.closed, "a feed outlives its tasks")
        self.assertEqual(by_task([c for c in chunks if c != KEEPALIVE]), {"a": [1, 2], "b": [5]})
        mux.close()
        self.assertEqual(self.broker._feeds, {}, "closing unfollows")
        reading.cancel()

    async def test_after_announcements_were_lost_a_feed_adds_the_running_tasks_it_lacks(self):
        running: list[RunningTask] = []
        reads: list[str] = []

        async def read(label: str) -> list[RunningTask]:
            reads.append(label)
            if len(reads) == 1:
                self.broker.announcements_lost()  # lost again during the read: read once more
            await asyncio.sleep(0)
            return [task for task in running if task.key.label == label]

        self.make(running=read)
        self.broker.announcements_lost()
        await asyncio.sleep(0.01)
        self.assertEqual(reads, [], "no feed: nothing to read")
        older, retried = TaskKey(A.label, "3"), TaskKey(A.label, "4")
        for key, name in ((B, "b"), (older, "older"), (retried, "retried")):
            await self.publish(ev(1, task=name), ev(2, task=name), key=key)
        mux, sink = self.open(feeds={A.label})
        chunks: list[bytes] = []

        async def read_some():
            async for chunk in sink.consume():
                chunks.append(chunk)

        reading = asyncio.create_task(read_some())
        self.broker.started([(A, 0)])  # heard: the feed has it already
        now = time.time()
        running[:] = [
            RunningTask(A, now, 1),
            RunningTask(B, now, 1),  # began after the feed opened, unheard: from its first event
            RunningTask(older, mux.opened_at - 60, 1),  # began before: its latest event first
            RunningTask(retried, now, 2),  # a later attempt: its latest event first
        ]
        self.broker.announcements_lost()
        await eventually(lambda: len(mux.views) == 4, message="the tasks the feed lacked")
        await live(mux)
        self.assertEqual(reads, [A.label, A.label])
        for key, name in ((A, "a"), (B, "b"), (older, "older"), (retried, "retried")):
            await self.publish(ev(3, "complete", task=name), key=key)
        await eventually(lambda: len(mux.ended) == 4, message="every task's end")
        await asyncio.sleep(0.01)  # (time for a duplicate to show)
        self.assertEqual(by_task(chunks), {"a": [3], "b": [1, 2, 3], "older": [2, 3], "retried": [2, 3]})
        self.assertFalse(mux.closed, "a feed outlives its tasks")
        mux.close()
        reading.cancel()

    async def test_shutdown_ends_every_mux_with_a_reconnect_hint(self):
        self.make()
        mux, sink = self.open((A, 0))
        feed, feed_sink = self.open(feeds={A.label})
        await live(mux)
        self.broker.close_subscriptions()
        for each, its_sink in ((mux, sink), (feed, feed_sink)):
            chunks = await self.consume(its_sink)
            self.assertIn(retry_hint(RECONNECT_HINT_MS), chunks)
            self.assertTrue(each.closed)

    async def test_access_running_out_writes_the_last_event_and_ends(self):
        self.make()
        mux, sink = self.open((A, 0), (B, 0), ends_in=0.05)
        mux.expire_with(b"event: access_expired\ndata: {}\n\n")
        await self.publish(ev(1, task="a"), key=A)
        chunks = await self.consume(sink)
        self.assertEqual(chunks[-1], b"event: access_expired\ndata: {}\n\n")
        self.assertEqual(by_task(chunks[:-1]), {"a": [1]})
        self.assertEqual(self.broker._channels.get(B), None)

    async def test_a_client_that_reads_nothing_is_cut_off_once(self):
        self.make(max_chunk=100)
        self.broker.send_timeout = 0.05
        mux, sink = self.open((A, 0), (B, 0))
        for seq in range(1, 20):
            await self.publish(ev(seq, task="a"), key=A)
            await self.publish(ev(seq, task="b"), key=B)
        await asyncio.sleep(0.2)  # nobody takes a chunk
        self.assertTrue(sink.ended)
        self.assertTrue(mux.closed)
        self.assertEqual(self.broker._channels[A].subs, set())
        self.assertEqual(self.broker._channels[B].subs, set())


def read_all(
    url: str, *, headers=None, timeout: float = 30.0, until=None, on_open=None
) -> tuple[int, str, list[SSE]]:
    """GET ``url``: its status, and for a stream its events until the server
    closes it (or ``until(events)`` says enough)."""
    events: list[SSE] = []
    with httpx.stream("GET", url, headers=headers or {}, timeout=timeout) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode(), []
        if on_open is not None:
            on_open()
        buffer = ""
        deadline = time.monotonic() + timeout
        for text in response.iter_text():
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                events.extend(parse_sse(block + "\n\n"))
            if until is not None and until(events):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not end within {timeout}s: {events}")
    return 200, "", events


def per_task(events: list[SSE]) -> dict[int, list[tuple[int | None, str]]]:
    seen: dict[int, list[tuple[int | None, str]]] = {}
    for event in events:
        seen.setdefault(event.data["_task_id"], []).append((event.id, event.event))
    return seen


class MuxServerTests(ServerTestCase):
    def mux(self, *parts: str) -> str:
        return f"{self.server.url}/stream/?" + "&".join(parts)

    def test_several_tasks_on_one_connection_equal_their_own_streams(self):
        first = ScriptedTask.objects.create(steps=4, delay=0.05, result={"n": 1})
        second = ScriptedTask.objects.create(steps=6, delay=0.03)
        status, body, events = read_all(
            self.mux(f"task=ScriptedTask/{first.pk}", f"task=testapp/ScriptedTask/{second.pk}", "history=all")
        )
        self.assertEqual(status, 200, body)
        seen = per_task(events)
        for task in (first, second):
            with self.subTest(task=task.pk):
                own = read_all(f"{self.url(task)}?history=all")[2]
                self.assertEqual(seen[task.pk], [(e.id, e.event) for e in own])
                self.assertEqual(seen[task.pk][-1][1], "complete")

    def test_each_task_resumes_from_its_own_cursor_and_204_once_all_are_seen(self):
        first = ScriptedTask.objects.create(steps=5)
        second = ScriptedTask.objects.create(steps=3)
        for task in (first, second):
            self.wait_status(task, "completed")
        _, _, events = read_all(
            self.mux(f"task=ScriptedTask/{first.pk}@3", f"task=ScriptedTask/{second.pk}@1")
        )
        seen = per_task(events)
        self.assertEqual([seq for seq, _ in seen[first.pk]], [4, 5, 6])
        self.assertEqual([seq for seq, _ in seen[second.pk]], [2, 3, 4])
        status, _, _ = read_all(
            self.mux(f"task=ScriptedTask/{first.pk}@6", f"task=ScriptedTask/{second.pk}@4")
        )
        self.assertEqual(status, 204)
        # One task still to see: it streams (only that one).
        status, _, events = read_all(
            self.mux(f"task=ScriptedTask/{first.pk}@6", f"task=ScriptedTask/{second.pk}@3")
        )
        self.assertEqual((status, list(per_task(events))), (200, [second.pk]))

    def test_a_feed_follows_running_tasks_and_every_task_that_starts_later(self):
        running = ScriptedTask.objects.create(steps=400, delay=0.05)
        self.wait_logged(running, 2)
        arrived: list[SSE] = []
        reader = _Reader(self.mux("feed=ScriptedTask"), arrived)
        reader.start()
        wait_for(lambda: reader.opened, message="the feed to open")
        wait_for(lambda: any(e.data["_task_id"] == running.pk for e in arrived), message="the running task")
        later = ScriptedTask.objects.create(steps=3, delay=0.01)
        wait_for(
            lambda: "complete" in [e.event for e in arrived if e.data["_task_id"] == later.pk],
            message="the later task's end on the feed",
        )
        first_of_running = next(e for e in arrived if e.data["_task_id"] == running.pk)
        self.assertGreaterEqual(first_of_running.id, 2, "a running task joins at its latest event")
        self.assertEqual([e.id for e in arrived if e.data["_task_id"] == later.pk], [1, 2, 3, 4])
        self.assertTrue(reader.is_alive(), "a feed stays open after its tasks end")
        ScriptedTask.objects.filter(pk=running.pk).update(cancel_requested=True)
        reader.close()

    def test_bad_requests_say_what_was_wrong(self):
        task = ScriptedTask.objects.create(steps=1)
        cases = [
            ("", 400, "Name the tasks to stream"),
            ("task=ScriptedTask", 400, "Malformed task='ScriptedTask'"),
            ("task=ScriptedTask/abc", 400, "Malformed task id 'abc'"),
            ("task=ScriptedTask/1@x", 400, "Malformed cursor 'x' in task='ScriptedTask/1@x'"),
            ("task=NoSuchModel/1", 404, "Unknown task model 'NoSuchModel'"),
            ("feed=NoSuchModel", 404, "Unknown task model 'NoSuchModel'"),
            ("feed=a/b/c", 400, "Malformed feed='a/b/c'"),
            ("task=ScriptedTask/999999", 404, "ScriptedTask 999999 not found"),
            (f"task=ScriptedTask/{task.pk}&history=some", 400, "Unknown history value"),
            ("&".join(f"task=ScriptedTask/{n}" for n in range(MAX_MUX_TASKS + 1)), 400, "Too many tasks"),
        ]
        for query, status, text in cases:
            with self.subTest(query=query[:60]):
                response = httpx.get(self.mux(query), timeout=10)
                self.assertEqual(response.status_code, status, response.text)
                self.assertIn(text, response.text)
        posted = httpx.post(self.mux(f"task=ScriptedTask/{task.pk}"), timeout=10)
        self.assertEqual(posted.status_code, 405)
        self.assertEqual(httpx.get(f"{self.server.url}/health", timeout=5).text, "OK")


class _Reader:
    """A feed read in a thread, for as long as the test needs it."""

    def __init__(self, url: str, into: list[SSE]):
        self.url = url
        self.into = into
        self.closed = False
        self.opened = False  # the response head arrived: the server follows the feed from now on
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        read_all(self.url, timeout=60, until=self._until, on_open=self._open)

    def _open(self) -> None:
        self.opened = True

    def _until(self, events: list[SSE]) -> bool:
        self.into[len(self.into) :] = events[len(self.into) :]
        return self.closed

    def close(self) -> None:
        self.closed = True


class MuxAccessTests(AccessCase):
    def mux(self, *parts: str) -> str:
        return f"{self.server.url}/stream/?" + "&".join(parts)

    def test_a_token_must_name_every_protected_task(self):
        one = PrivateTask.objects.create(steps=1)
        two = PrivateTask.objects.create(steps=1)
        public = ScriptedTask.objects.create(steps=1)
        for task in (one, two, public):
            self.wait_status(task, "completed")
        tasks = [
            f"task=PrivateTask/{one.pk}@0",
            f"task=PrivateTask/{two.pk}@0",
            f"task=ScriptedTask/{public.pk}@0",
        ]
        self.assertRefused(self.get(self.mux(*tasks)), 403, f"PrivateTask {one.pk}")
        only_one = access.stream_token(one)
        self.assertRefused(self.get(self.mux(*tasks, f"token={only_one}")), 403, f"PrivateTask {two.pk}")
        both = access.stream_token([one, two])
        status, _, events = read_all(self.mux(*tasks), headers={"authorization": f"Bearer {both}"})
        self.assertEqual(status, 200)
        self.assertEqual(sorted(per_task(events)), sorted([one.pk, two.pk, public.pk]))
        self.assertRefused(self.get(self.mux(*tasks, "token=garbage")), 401, "Invalid stream token")

    def test_a_feed_needs_the_models_permission_or_a_feed_token(self):
        PrivateTask.objects.create(steps=1)
        feed = self.mux("feed=PrivateTask")
        self.assertRefused(self.get(feed), 403, "Not allowed to follow every PrivateTask")
        task_token = access.stream_token(PrivateTask.objects.create(steps=1))
        self.assertRefused(self.get(feed + f"&token={task_token}"), 403, "Not allowed to follow")
        user = User.objects.create_user("viewer", password="x")
        self.assertRefused(self.get(feed, cookie=self.session_cookie(user)), 403, "Not allowed to follow")
        user.user_permissions.add(Permission.objects.get(codename="view_privatetask"))
        opened = _opens(feed, cookie=self.session_cookie(User.objects.get(pk=user.pk)))
        self.assertEqual(opened, 200)
        self.assertEqual(_opens(feed + f"&token={access.stream_token(feeds=[PrivateTask])}"), 200)

    def test_a_feed_grant_covers_the_tasks_named_beside_it(self):
        # How clients resume a feed: the tasks it brought them, with their cursors.
        task = PrivateTask.objects.create(steps=2)
        self.wait_status(task, "completed")
        resume = self.mux("feed=PrivateTask", f"task=PrivateTask/{task.pk}@1")
        feed_token = access.stream_token(feeds=[PrivateTask])
        status, _, events = read_all(resume + f"&token={feed_token}", until=lambda seen: len(seen) >= 2)
        self.assertEqual(status, 200)
        self.assertEqual([(e.id, e.event) for e in events], [(2, "step"), (3, "complete")])
        alone = self.mux(f"task=PrivateTask/{task.pk}@1", f"token={feed_token}")
        self.assertRefused(self.get(alone), 403, f"PrivateTask {task.pk}")  # no feed asked: its own rule

    def test_a_models_per_row_rule_keeps_its_feed_to_superusers(self):
        user = User.objects.create_user("viewer", password="x")
        user.user_permissions.add(Permission.objects.get(codename="view_ownedtask"))
        feed = self.mux("feed=OwnedTask")
        self.assertTrue(OwnedTask(owner=user).has_stream_permission(user))
        self.assertRefused(self.get(feed, cookie=self.session_cookie(user)), 403, "Not allowed to follow")
        root = User.objects.create_superuser("root", password="x")
        self.assertEqual(_opens(feed, cookie=self.session_cookie(root)), 200)


class FeedPermissionTests(TestCase):
    def test_a_rule_per_row_in_either_hook_keeps_the_feed_to_superusers(self):
        viewer = User.objects.create_user("viewer", password="x")
        viewer.user_permissions.add(Permission.objects.get(codename="view_privatetask"))
        viewer = User.objects.get(pk=viewer.pk)
        root = User.objects.create_superuser("root", password="x")
        self.assertTrue(PrivateTask.has_feed_permission(viewer))  # no rule per row: the view permission

        async def owner_only(task, user):
            return False

        with mock.patch.object(PrivateTask, "ahas_stream_permission", owner_only):
            self.assertFalse(PrivateTask.has_feed_permission(viewer))
            self.assertTrue(PrivateTask.has_feed_permission(root))


def _opens(url: str, **headers) -> int:
    """The status of a stream request, without reading the stream."""
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        return response.status_code


class MuxAsgiPathTests(MuxServerTests):
    """The same streams on the ASGI path: config.asgi:application under plain uvicorn."""

    server_settings = {"command": UVICORN, "env": HOSTS_SETTINGS}


class MuxDistributedTests(DistributedTestCase):
    """A feed on a node that runs no task follows the tasks another node claims
    (announced through Redis)."""

    def setUp(self):
        self.servers = [
            ServerProcess(lease_seconds=3, run_tasks=False).start(),
            ServerProcess(lease_seconds=3).start(),
        ]

    def test_a_feed_on_one_node_sees_tasks_run_on_another(self):
        watcher, _worker = self.servers  # the watcher runs no task: they all run on the worker
        arrived: list[SSE] = []
        reader = _Reader(f"{watcher.url}/stream/?feed=ScriptedTask", arrived)
        reader.start()
        wait_for(lambda: reader.opened, message="the feed to open")
        tasks = [ScriptedTask.objects.create(steps=3, delay=0.01) for _ in range(10)]
        wait_for(
            lambda: all(
                "complete" in [e.event for e in arrived if e.data["_task_id"] == task.pk] for task in tasks
            ),
            timeout=30,
            message="every task's end on the feed",
        )
        for task in tasks:
            self.assertEqual([e.id for e in arrived if e.data["_task_id"] == task.pk], [1, 2, 3, 4])
        reader.close()


class MuxLostAnnouncementTests(DistributedTestCase):
    """A node whose pub/sub subscription dropped misses the announcements sent
    meanwhile (Redis keeps nothing for an absent subscriber): once subscribed
    again it reads the running tasks, so its feeds still get them."""

    def setUp(self):
        url = get_settings().BROKER_URL
        self.redis = redis.Redis.from_url(url)
        self.addCleanup(self.redis.close)
        where = self.redis.connection_pool.connection_kwargs
        self.db = str(where["db"])
        # The watcher reaches Redis through a proxy the test can cut; the worker directly.
        self.proxy = TcpProxy(where["host"], where["port"]).start()
        self.addCleanup(self.proxy.stop)
        through_proxy = f"redis://127.0.0.1:{self.proxy.port}/{self.db}"
        self.servers = [
            ServerProcess(lease_seconds=3, run_tasks=False, broker_url=through_proxy).start(),
            ServerProcess(lease_seconds=3).start(),
        ]

    def subscribers(self) -> int:
        """Pub/sub connections on this suite's database (pub/sub itself spans them all)."""
        return sum(1 for client in self.redis.client_list(_type="pubsub") if client["db"] == self.db)

    def test_a_feed_gets_a_task_announced_while_its_node_was_resubscribing(self):
        watcher, _worker = self.servers
        heard = self.redis.pubsub(ignore_subscribe_messages=True)
        self.addCleanup(heard.close)
        heard.subscribe(started_channel(get_settings().BROKER_URL))
        wait_for(lambda: self.subscribers() == 3, message="both nodes and the test to subscribe")
        arrived: list[SSE] = []
        reader = _Reader(f"{watcher.url}/stream/?feed=ScriptedTask", arrived)
        reader.start()
        wait_for(lambda: reader.opened, message="the feed to open")
        # The watcher's connections are cut, and its reconnections held.
        self.proxy.stall()
        self.proxy.reset()
        wait_for(lambda: self.subscribers() == 2, message="the watcher's subscription to drop")
        # A pk of its own: another suite's nodes on this Redis announce theirs on the same channel.
        task = ScriptedTask.objects.create(pk=random.randrange(10**8, 10**9), steps=40, delay=0.1)
        announced = f"{TaskKey.of(task)} ".encode()

        def announcement_heard() -> bool:
            message = heard.get_message(timeout=0.1)
            return message is not None and announced in message["data"]

        wait_for(announcement_heard, timeout=15, message="the task's announcement")
        self.assertEqual(self.subscribers(), 2, "announced while the watcher was not subscribed")
        task.refresh_from_db()
        self.assertEqual(task.status, "running", "still running when the watcher subscribes again")
        self.proxy.heal()
        wait_for(
            lambda: "complete" in [e.event for e in arrived if e.data["_task_id"] == task.pk],
            timeout=30,
            message="the task's end on the watcher's feed",
        )
        # The run began after the feed opened: from its first event, each once.
        self.assertEqual([e.id for e in arrived if e.data["_task_id"] == task.pk], list(range(1, 42)))
        self.assertTrue(reader.is_alive(), "the feed stays open")
        reader.close()
