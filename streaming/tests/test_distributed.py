"""Many nodes, one PostgreSQL, one Redis: end to end with real services.

These run when the suite itself runs on PostgreSQL with the Redis broker:

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \\
    STREAMING_BROKER_URL=redis://127.0.0.1:6379/0 \\
    poetry run python manage.py test --noinput

Otherwise they skip (saying so); with STREAMING_REQUIRE_DISTRIBUTED=1 (CI)
a skip is a failure.
"""

import asyncio
import collections
import contextlib
import os
import threading
import unittest

import httpx
from django.db import connection
from django.test import TransactionTestCase

from streaming.conf import get_settings
from streaming.keys import TaskKey
from streaming.tests.testapp.models import ScriptedTask

from .support import ServerProcess, read_stream, wait_for

HOW = (
    "distributed tests need PostgreSQL and Redis: run the suite with "
    "DATABASE_URL=postgres://postgres@127.0.0.1:5432/test "
    "STREAMING_BROKER_URL=redis://127.0.0.1:6379/0"
)


def distributed_mode() -> bool:
    url = get_settings().BROKER_URL or ""
    return connection.vendor == "postgresql" and url.startswith("redis")


class DistributedTestCase(TransactionTestCase):
    nodes = 3
    node_settings = {"lease_seconds": 3}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if not distributed_mode():
            if os.environ.get("STREAMING_REQUIRE_DISTRIBUTED") == "1":
                raise AssertionError(f"STREAMING_REQUIRE_DISTRIBUTED=1 but {HOW}")
            raise unittest.SkipTest(HOW)

    def setUp(self):
        self.servers = [ServerProcess(**self.node_settings).start() for _ in range(self.nodes)]

    def tearDown(self):
        for server in self.servers:
            server.stop()

    @staticmethod
    def running_on(server, tasks):
        pid = f":{server.proc.pid}:"
        return [
            task
            for task in ScriptedTask.objects.filter(pk__in=[t.pk for t in tasks], status="running")
            if task.lease_owner and pid in task.lease_owner
        ]

    def url(self, server, task, **query):
        path = task.get_stream_path()
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return f"{server.url}{path}"


class ManyNodesTests(DistributedTestCase):
    def test_every_client_on_every_node_gets_every_event_once_and_each_task_runs_once(self):
        tasks = [ScriptedTask.objects.create(steps=10, delay=0.02, status="created") for _ in range(30)]
        received = collections.defaultdict(list)
        errors = []

        def watch(task, server, slot):
            try:
                received[(task.pk, slot)] = read_stream(
                    self.url(server, task), headers={"Last-Event-ID": "0"}, timeout=60
                )
            except Exception as exc:  # reported below, with the node
                errors.append((task.pk, server.port, exc))

        readers = []
        for i, task in enumerate(tasks):
            for slot in range(3):  # three clients per task, on three different nodes
                server = self.servers[(i + slot) % len(self.servers)]
                readers.append(threading.Thread(target=watch, args=(task, server, slot)))
        for reader in readers:
            reader.start()
        # Start them from this process: the wake-up goes through Redis.
        for task in tasks:
            task.start()
        for reader in readers:
            reader.join(90)
        self.assertEqual(errors, [])
        expected = [(seq, "step") for seq in range(1, 11)] + [(11, "complete")]
        for task in tasks:
            for slot in range(3):
                self.assertEqual(
                    [(e.id, e.event) for e in received[(task.pk, slot)]], expected, (task.pk, slot)
                )
        for task in tasks:
            task.refresh_from_db()
            self.assertEqual((task.status, task.attempts), ("completed", 1), "ran exactly once")

    def test_a_node_killed_mid_run_its_tasks_finish_elsewhere_and_clients_resume(self):
        tasks = [ScriptedTask.objects.create(steps=30, delay=0.1) for _ in range(9)]
        seen = collections.defaultdict(list)

        def watch(task, server):
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                read_stream(
                    self.url(server, task),
                    headers={"Last-Event-ID": "0"},
                    on_event=seen[(task.pk, server.port)].append,
                    timeout=60,
                )

        readers = [
            threading.Thread(target=watch, args=(task, server)) for task in tasks for server in self.servers
        ]
        for reader in readers:
            reader.start()

        def all_running():
            return all(ScriptedTask.objects.get(pk=t.pk).status == "running" for t in tasks)

        wait_for(all_running, timeout=20, message="every task to run")
        victim = max(self.servers, key=lambda server: len(self.running_on(server, tasks)))
        survivors = [server for server in self.servers if server is not victim]
        on_victim = self.running_on(victim, tasks)
        self.assertTrue(on_victim)
        wait_for(lambda: all(len(seen[(t.pk, victim.port)]) >= 3 for t in tasks), timeout=20)
        victim.kill9()
        for reader in readers:
            reader.join(60)
        for task in tasks:
            # The client that was on the dead node resumes on another with Last-Event-ID.
            before = seen[(task.pk, victim.port)]
            last = before[-1].id
            rest = read_stream(
                self.url(survivors[task.pk % 2], task),
                headers={"Last-Event-ID": str(last)},
                timeout=60,
            )
            self.assertEqual(rest[-1].event, "complete", task.pk)
            full = read_stream(self.url(survivors[0], task, history="all"), timeout=30)
            ids = [e.id for e in full]
            self.assertEqual(ids, sorted(set(ids)))
            self.assertEqual([e.id for e in rest], [i for i in ids if i > last], "no gap")
            # Clients that stayed on live nodes saw the whole task end.
            for server in survivors:
                self.assertEqual(seen[(task.pk, server.port)][-1].event, "complete")
        for task in tasks:
            task.refresh_from_db()
            self.assertEqual(task.status, "completed")
        for task in on_victim:
            task.refresh_from_db()
            self.assertEqual(task.attempts, 2, "taken up again by another node")


class GracefulShutdownTests(DistributedTestCase):
    # Leases far longer than the test: only a hand-back explains a quick resume.
    node_settings = {"lease_seconds": 60}

    def test_sigterm_hands_running_tasks_to_another_node_at_once(self):
        tasks = [ScriptedTask.objects.create(steps=40, delay=0.1) for _ in range(6)]
        wait_for(
            lambda: ScriptedTask.objects.filter(status="running").count() == len(tasks),
            timeout=20,
            message="every task to run",
        )
        leaving = max(self.servers, key=lambda server: len(self.running_on(server, tasks)))
        handed = self.running_on(leaving, tasks)
        self.assertTrue(handed)
        leaving.stop()
        self.assertIn("Handed", leaving.log())
        for task in handed:
            task.refresh_from_db()
            self.assertNotIn(f":{leaving.proc.pid}:", task.lease_owner or "")
        wait_for(
            lambda: all(ScriptedTask.objects.get(pk=t.pk).status == "completed" for t in tasks),
            timeout=30,
            message="every task to complete on the remaining nodes",
        )
        for task in handed:
            task.refresh_from_db()
            self.assertEqual(task.attempts, 2)


class WorkersTests(DistributedTestCase):
    nodes = 0

    def test_workers_share_one_port_and_serve_every_event(self):
        server = ServerProcess(workers=2).start()
        self.servers.append(server)
        wait_for(lambda: server.log().count("Streaming node started") == 2, message="both workers")
        tasks = [ScriptedTask.objects.create(steps=5, delay=0.05, status="created") for _ in range(6)]
        results = {}
        readers = [
            threading.Thread(
                target=lambda t=t, i=i: results.__setitem__(
                    (t.pk, i), read_stream(self.url(server, t), headers={"Last-Event-ID": "0"})
                )
            )
            for t in tasks
            for i in range(4)
        ]
        for reader in readers:
            reader.start()
        for task in tasks:
            task.start()
        for reader in readers:
            reader.join(60)
        for (pk, _), events in results.items():
            self.assertEqual([e.id for e in events], [1, 2, 3, 4, 5, 6], pk)
        self.assertEqual(len(results), 24)
        owners = {
            line.split("(")[1].split(")")[0]
            for line in server.log().splitlines()
            if "Streaming node started" in line
        }
        self.assertEqual(len(owners), 2, "two worker processes, each its own node")


def redis_hub(settings, log):
    """A node's hub on the Redis transport, without a runner."""
    from streaming.fanout.hub import Hub
    from streaming.transports.redis import RedisTransport

    transport = RedisTransport(settings.BROKER_URL, settings=settings)
    hub = Hub(transport=transport, history=transport.history(log), settings=settings)
    transport.bind(hub, on_wake=lambda: None)
    return hub, transport


class RedisTransportTests(DistributedTestCase):
    """The Redis transport under a hub, against the real Redis."""

    nodes = 0

    def test_clients_leaving_while_their_watch_starts_leave_nothing_behind(self):
        from asgiref.sync import async_to_sync

        from streaming.tasks.eventlog import EventLog

        settings = get_settings()

        async def scenario():
            broker, transport = redis_hub(settings, EventLog(0.05, 500))
            await transport.start()
            try:
                key = TaskKey("testapp.scriptedtask", "987654321")
                for _ in range(50):
                    subscription = broker.subscribe(key, 0)
                    pending = asyncio.ensure_future(subscription.__anext__())
                    await asyncio.sleep(0)  # inside _watch's Redis call
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
                    await subscription.aclose()
                return (
                    set(transport._watched),
                    dict(transport._cursors),
                    dict(broker._watchers),
                    dict(broker._channels),
                )
            finally:
                await broker.stop()
                await transport.stop()

        watched, cursors, watchers, channels = async_to_sync(scenario)()
        self.assertEqual((watched, cursors, watchers, channels), (set(), {}, {}, {}))

    def test_a_node_whose_run_moved_elsewhere_serves_what_the_other_node_sent(self):
        # Node A ran the task (events 1..5, in its memory), lost the lease without
        # an end; node B went on with 6..10. A client of A resuming from 3 must
        # get 4..11 with nothing skipped.
        import redis.asyncio as aioredis
        from asgiref.sync import async_to_sync

        from streaming.transports.redis import stream_name

        from .test_broker import FakeHistory, ev, seqs_of

        settings = get_settings()
        key = TaskKey("testapp.scriptedtask", "987654322")

        async def scenario():
            log = FakeHistory()
            node_a, transport_a = redis_hub(settings, log)
            other = aioredis.Redis.from_url(settings.BROKER_URL)
            await transport_a.start()
            try:
                await other.delete(stream_name(key))
                for i in range(1, 6):
                    await node_a.publish(key, ev(i))
                    log.add(key, ev(i))
                await transport_a.flush()
                node_a.run_stopped(key)  # the lease is lost: no end from A
                for i in range(6, 11):
                    await other.xadd(stream_name(key), {"t": "progress", "p": ev(i).payload}, id=f"{i}-0")
                    log.add(key, ev(i))
                got = []
                async with contextlib.aclosing(node_a.subscribe(key, 3)) as chunks:
                    async with asyncio.timeout(10):
                        async for chunk in chunks:
                            got += seqs_of(chunk)
                            if got[-1] == 10:
                                end = {"t": "complete", "p": ev(11, "complete").payload}
                                await other.xadd(stream_name(key), end, id="11-0")
                return got
            finally:
                await other.delete(stream_name(key))
                await other.aclose()
                await node_a.stop()
                await transport_a.stop()

        self.assertEqual(async_to_sync(scenario)(), list(range(4, 12)))

    def test_deployments_on_two_databases_of_one_redis_neither_wake_nor_feed_each_other(self):
        # Pub/sub spans a Redis server's databases: the channels are named per database.
        import redis.asyncio as aioredis
        from asgiref.sync import async_to_sync

        from streaming.transports.redis import RedisTransport

        from .support import eventually

        settings = get_settings()

        class Heard:
            def __init__(self):
                self.announced_keys: list[str] = []
                self.wakes = 0

            def announced(self, starts):
                self.announced_keys += [str(key) for key, _after in starts]

            def woken(self):
                self.wakes += 1

        async def scenario():
            where = aioredis.Redis.from_url(settings.BROKER_URL).connection_pool.connection_kwargs
            db = int(where.get("db") or 0)
            urls = [f"redis://{where['host']}:{where['port']}/{n}" for n in (db, (db + 8) % 16)]
            transports, heard = [], []
            try:
                for url in urls:
                    transport, ears = RedisTransport(url, settings=settings), Heard()
                    transport.bind(ears, on_wake=ears.woken)  # (only these two are called here)
                    await transport.start()
                    transports.append(transport)
                    heard.append(ears)
                for n, (transport, ears) in enumerate(zip(transports, heard, strict=True)):
                    # Each hears its own: subscribed (announced again until it is).
                    own = f"testapp.scriptedtask:98765432{n}"

                    async def announced(transport=transport, ears=ears, own=own):
                        transport.announce([(TaskKey.parse(own), 0)])
                        await asyncio.sleep(0.05)
                        return own in ears.announced_keys

                    async with asyncio.timeout(10):
                        while not await announced():
                            pass
                ours, theirs = heard
                before = theirs.wakes
                await transports[0].wake()
                await eventually(lambda: ours.wakes > 0, message="our own wake-up")
                await asyncio.sleep(0.3)  # what would cross, would have by now
                return theirs.announced_keys, theirs.wakes - before
            finally:
                for transport in transports:
                    await transport.stop()

        theirs_heard, theirs_woken = async_to_sync(scenario)()
        self.assertEqual(theirs_heard, ["testapp.scriptedtask:987654321"], "only its own announcement")
        self.assertEqual(theirs_woken, 0)

    def test_an_announcement_whose_publish_failed_is_published_once_more(self):
        # Redis is out of this node's reach when it announces a claim (nothing
        # listens where it connects), and back within the retry's pause.
        import redis.asyncio as aioredis
        from asgiref.sync import async_to_sync

        from streaming.transports.redis import RedisTransport

        from .support import eventually, free_port
        from .tcpproxy import TcpProxy

        settings = get_settings()
        key = TaskKey("testapp.scriptedtask", "987654323")

        async def scenario():
            other = aioredis.Redis.from_url(settings.BROKER_URL)
            where = other.connection_pool.connection_kwargs
            port = free_port()
            transport = RedisTransport(f"redis://127.0.0.1:{port}/{where['db']}", settings=settings)
            heard = other.pubsub(ignore_subscribe_messages=True)
            await heard.subscribe(transport.started_channel)
            proxy = None
            try:
                with self.assertLogs("streaming.transports.redis", "WARNING") as logs:
                    transport.announce([(key, 0)])
                    await eventually(
                        lambda: any("trying once more" in line for line in logs.output),
                        message="the failed announcement",
                    )
                    proxy = TcpProxy(where["host"], where["port"], port=port).start()
                    async with asyncio.timeout(10):
                        # (Pub/sub spans Redis's databases: skip other suites' announcements.)
                        while True:
                            message = await heard.get_message(timeout=1)
                            if message is not None and message["data"] == f"{key} 0".encode():
                                break
                    await asyncio.sleep(0.1)  # (time for a failure to be logged, if any)
                return [line for line in logs.output if "failed again" in line]
            finally:
                await transport.stop()
                if proxy is not None:
                    proxy.stop()
                await heard.aclose()
                await other.aclose()

        self.assertEqual(async_to_sync(scenario)(), [], "published at the second try")
