"""/metrics and the counts behind it: what a scrape says against what the test did.

In process: the hub's counts of what it wrote (per flush, with clients at
other cursors, full sockets, resumes, gaps, stalled clients), the event
log's backlog and lag, the Redis outbox. End to end: a real server with
METRICS on, tasks running and streams open, scraped over HTTP and parsed
with prometheus-client's parser; who may read it; the log lines of a run;
and ``--workers 2`` (PostgreSQL + Redis) summing its workers' figures.
"""

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import threading
import unittest
from pathlib import Path
from unittest import mock

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from django.test import SimpleTestCase, TransactionTestCase, override_settings
from prometheus_client.parser import text_string_to_metric_families

from streaming import conf
from streaming.checks import check_metrics
from streaming.node import Node
from streaming.tasks.eventlog import EventLog
from streaming.tests.testapp.models import FragileTask, ScriptedTask
from streaming.web import metrics as web_metrics
from streaming.web.metrics import Recorder

from .servercase import ServerTestCase
from .support import ServerProcess, eventually, node_settings, serving, wait_for
from .test_broker import KEY, BrokerTestCase, ev
from .test_distributed import HOW, distributed_mode
from .test_runner import DEAD_OWNER, make_orphan, wait_status

TOKEN = "metrics-token-for-the-tests-0123456789"
MODEL = "testapp.scriptedtask"


class RecordingSink:
    """A client's socket as the hub sees it: records what it is written; ``paused``: full."""

    def __init__(self, paused=False):
        self.paused = paused
        self.chunks: list[bytes] = []
        self.ended = False
        self.aborted = False
        self._drained = asyncio.Event()

    def write(self, data):
        self.chunks.append(data)

    async def drain(self):
        while self.paused:
            self._drained.clear()
            await self._drained.wait()

    def resume(self):
        self.paused = False
        self._drained.set()

    def end(self):
        self.ended = True

    def abort(self):
        self.aborted = True

    @property
    def event_chunks(self) -> list[bytes]:
        return [chunk for chunk in self.chunks if b"\nid: " in chunk or chunk.startswith(b"id: ")]

    @property
    def events(self) -> int:
        return sum(chunk.count(b"\nid: ") for chunk in self.event_chunks)

    @property
    def event_bytes(self) -> int:
        return sum(len(chunk) for chunk in self.event_chunks)


class HubCountTests(BrokerTestCase):
    """The hub counts exactly what it writes, though live clients are counted together."""

    async def live(self, hub, sinks, after=0, key=KEY):
        subs = [hub.attach(key, after, sink) for sink in sinks]
        async with asyncio.timeout(2):
            while any(sub.task is not None for sub in subs):  # noqa: ASYNC110 - until every one is live
                await asyncio.sleep(0)
        return subs

    def assert_counts(self, hub, sinks):
        self.assertEqual(hub.delivered, sum(sink.events for sink in sinks))
        self.assertEqual(hub.bytes_written, sum(sink.event_bytes for sink in sinks))

    async def test_live_clients_one_flush_per_turn_and_a_burst(self):
        hub = self.make()
        sinks = [RecordingSink() for _ in range(5)]
        await self.live(hub, sinks)
        for i in range(1, 4):
            await self.publish(ev(i))
            await asyncio.sleep(0)
        await self.publish(*(ev(i) for i in range(4, 9)))  # one turn: one flush, one chunk
        await asyncio.sleep(0)
        self.assertEqual(hub.published, 8)
        self.assertEqual([sink.events for sink in sinks], [8] * 5)
        self.assertEqual(hub.delivered, 40)
        self.assertEqual(hub.bytes_written, 5 * sum(len(ev(i).sse) for i in range(1, 9)))
        self.assert_counts(hub, sinks)

    async def test_a_client_at_another_cursor_and_one_whose_socket_fills(self):
        hub = self.make()
        await self.publish(*(ev(i) for i in range(1, 6)))
        common = [RecordingSink() for _ in range(3)]
        await self.live(hub, common, after=5)
        ahead = RecordingSink()
        await self.live(hub, [ahead], after=7)  # a Last-Event-ID past what this node holds
        full = RecordingSink()
        await self.live(hub, [full], after=5)
        self.assertEqual(hub.resumes, 5)  # every one of them came with an id it had
        full.paused = True
        await self.publish(*(ev(i) for i in range(6, 10)))
        await asyncio.sleep(0)
        self.assertEqual([s.events for s in common], [4, 4, 4])
        self.assertEqual(ahead.events, 2)  # 8 and 9 only
        self.assertEqual(full.events, 0)
        self.assert_counts(hub, [*common, ahead, full])
        full.resume()  # it catches up by itself: counted per chunk
        await eventually(lambda: full.events == 4, message="the full socket's catch-up")
        self.assert_counts(hub, [*common, ahead, full])
        self.assertEqual(hub.delivered, 12 + 2 + 4)

    async def test_a_catch_up_in_chunks_is_counted_per_chunk(self):
        hub = self.make(max_chunk=300)
        self.history.add(KEY, *(ev(i, filler="x" * 100) for i in range(1, 21)))
        sink = RecordingSink()
        await self.live(hub, [sink], after=0)
        self.assertEqual(sink.events, 20)
        self.assertGreater(len(sink.chunks), 1)
        self.assert_counts(hub, [sink])
        self.assertEqual(hub.resumes, 0)  # from the start (?history=all) is no resume

    async def test_resumes_and_the_incomplete_ones(self):
        with self.subTest("a gap that neither memory nor the log fills: persist_events=False"):
            hub = self.make(history_size=2)
            await self.publish(*(ev(i) for i in range(1, 11)), persist=False)
            sink = RecordingSink()
            await self.live(hub, [sink], after=1)
            self.assertEqual((hub.resumes, hub.resumes_incomplete), (1, 1))
        with self.subTest("a numbering gap between attempts is complete"):
            hub = self.make(history_size=2)
            await self.publish(ev(1), ev(2), ev(3))
            await self.publish(*(ev(i) for i in range(1001, 1006)))
            sink = RecordingSink()
            await self.live(hub, [sink], after=3)
            self.assertEqual((hub.resumes, hub.resumes_incomplete), (1, 0))
            self.assertEqual(sink.events, 5)
        with self.subTest("a new client (no Last-Event-ID) is no resume"):
            hub = self.make()
            await self.publish(ev(1), ev(2))
            await self.live(hub, [RecordingSink()], after=None)
            self.assertEqual(hub.resumes, 0)

    async def test_a_client_that_reads_nothing_is_cut_off_and_counted(self):
        hub = self.make()
        hub.send_timeout = 0.05
        stalled = RecordingSink()
        await self.live(hub, [stalled])
        stalled.paused = True
        await self.publish(ev(1))
        await eventually(lambda: stalled.aborted, message="the stalled client cut off")
        self.assertEqual(hub.cut_off, 1)

    async def test_events_from_other_processes_count_once(self):
        hub = self.make()
        await self.live(hub, [RecordingSink()])
        await self.publish(ev(1))
        hub.deliver(KEY, ev(1))  # Redis gives a node its own events back: not received
        hub.deliver(KEY, ev(2))
        self.assertEqual((hub.published, hub.received), (1, 1))


class EventLogCountTests(unittest.IsolatedAsyncioTestCase):
    async def test_pending_lag_and_written(self):
        log = EventLog(flush_interval=60, batch_size=500)
        self.assertEqual((log.pending, log.lag(), log.written), (0, 0.0, 0))
        release = threading.Event()

        def slow_write(rows):
            release.wait(5)
            return []

        with mock.patch("streaming.tasks.store.write_log", slow_write):
            for i in range(1, 4):
                log.append(KEY, ev(i))
            await asyncio.sleep(0.05)
            self.assertEqual(log.pending, 3)
            self.assertGreaterEqual(log.lag(), 0.05)
            flushing = asyncio.create_task(log.flush())
            await asyncio.sleep(0.05)
            log.append(KEY, ev(4))  # while the first batch is being written
            self.assertEqual(log.pending, 4)
            self.assertGreaterEqual(log.lag(), 0.1)  # the batch in flight is the oldest
            release.set()
            await flushing
            self.assertEqual((log.pending, log.written), (1, 3))
            self.assertLess(log.lag(), 0.1)
            await log.flush()
        self.assertEqual((log.pending, log.lag(), log.written), (0, 0.0, 4))

    async def test_a_failed_write_keeps_its_events_and_their_age(self):
        log = EventLog(flush_interval=60, batch_size=500)
        log.append(KEY, ev(1))
        await asyncio.sleep(0.05)
        with (
            mock.patch("streaming.tasks.store.write_log", side_effect=OSError("down")),
            self.assertRaises(OSError),
        ):
            await log.flush()
        self.assertEqual((log.pending, log.written), (1, 0))
        self.assertGreaterEqual(log.lag(), 0.05)


class RedisOutboxTests(unittest.IsolatedAsyncioTestCase):
    async def test_the_backlog_is_what_was_not_sent(self):
        from streaming.transports.redis import RedisTransport

        settings = conf.StreamingSettings()
        transport = RedisTransport("redis://127.0.0.1:1/0", settings=settings)  # never started
        for i in range(1, 4):
            transport.publish(KEY, ev(i))
        self.assertEqual(transport.backlog, 3)
        await transport.redis.aclose(close_connection_pool=True)
        await transport._reader.aclose()


class SettingsTests(SimpleTestCase):
    def test_metrics_are_off_by_default_and_need_no_token(self):
        defaults = conf.StreamingSettings()
        self.assertEqual((defaults.METRICS, defaults.METRICS_TOKEN), (False, None))

    def test_a_short_token_fails_clearly(self):
        for token in ("short", " " * 20, 12345678901234567):
            with self.subTest(token=token), override_settings(STREAMING={"METRICS_TOKEN": token}):
                conf.get_settings.cache_clear()
                with self.assertRaisesRegex(ImproperlyConfigured, "METRICS_TOKEN.*at least 16"):
                    conf.get_settings()
        conf.get_settings.cache_clear()

    def test_metrics_is_true_or_false(self):
        with override_settings(STREAMING={"METRICS": "yes"}):
            conf.get_settings.cache_clear()
            with self.assertRaisesRegex(ImproperlyConfigured, "METRICS'] must be True or False"):
                conf.get_settings()
        conf.get_settings.cache_clear()

    def test_from_the_environment(self):
        values = conf.from_environ(environ={"STREAMING_METRICS": "on", "STREAMING_METRICS_TOKEN": TOKEN})
        self.assertEqual(values, {"METRICS": True, "METRICS_TOKEN": TOKEN})

    def test_a_check_says_when_prometheus_client_is_missing(self):
        with override_settings(STREAMING={"METRICS": True}):
            conf.get_settings.cache_clear()
            self.assertEqual(check_metrics(), [])
            with mock.patch("importlib.util.find_spec", return_value=None):
                [warning] = check_metrics()
            self.assertEqual(warning.id, "streaming.W004")
        conf.get_settings.cache_clear()


class RunnerRecordTests(TransactionTestCase):
    """What the runner tells the recorder, and logs, for runs that end otherwise than completed."""

    def recorded(self, recorder) -> dict[tuple[str, tuple], float]:
        found = {}
        for metric in recorder.metrics:
            for family in metric.collect():
                for sample in family.samples:
                    found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return found

    async def test_a_recovery_is_counted_and_logged_with_attempt_and_duration(self):
        retried = await sync_to_async(make_orphan)(ScriptedTask, DEAD_OWNER, expires_in=60, steps=2)
        failed = await sync_to_async(make_orphan)(FragileTask, DEAD_OWNER, expires_in=60, steps=2)
        recorder = Recorder()
        with self.assertLogs("streaming.tasks.runner", "INFO") as logs:
            node = Node(node_settings())
            node.runner.observer = recorder
            async with node:
                await wait_status(retried, "completed")
                await wait_status(failed, "failed")
        found = self.recorded(recorder)
        self.assertEqual(value(found, "streaming_tasks_recovered_total", model=MODEL, outcome="requeued"), 1)
        fragile = "testapp.fragiletask"
        self.assertEqual(value(found, "streaming_tasks_recovered_total", model=fragile, outcome="failed"), 1)
        self.assertEqual(value(found, "streaming_tasks_claimed_total", model=MODEL), 1)  # the retry
        self.assertEqual(
            value(found, "streaming_task_run_seconds_count", model=MODEL, outcome="completed"), 1
        )
        waits = "streaming_task_queue_wait_seconds_count"
        self.assertEqual(value(found, waits, model=MODEL), 0)  # a second attempt: no wait observed
        lines = "\n".join(logs.output)
        self.assertRegex(
            lines,
            rf"WARNING:.*:Recovered {MODEL}:{retried.pk}: its server died "
            r"\(attempt 1, claimed [\d.]+ s before\); running it again",
        )
        self.assertRegex(lines, rf"Recovered {fragile}:{failed.pk}: .*\(attempt 1, .*failed by its policy")
        self.assertIn(f"INFO:streaming.tasks.runner:Started {MODEL}:{retried.pk} (attempt 2)", lines)
        self.assertRegex(lines, rf"INFO:.*:Task {MODEL}:{retried.pk} completed \(attempt 2, [\d.]+ s\)")
        [recovery] = [r for r in logs.records if r.getMessage().startswith(f"Recovered {MODEL}")]
        self.assertEqual((recovery.task_key, recovery.attempt), (f"{MODEL}:{retried.pk}", 1))
        self.assertGreaterEqual(recovery.duration, 5)  # make_orphan claimed it 5 s before
        [end] = [r for r in logs.records if getattr(r, "outcome", None) == "completed"]
        self.assertEqual((end.task_key, end.attempt, end.outcome), (f"{MODEL}:{retried.pk}", 2, "completed"))
        self.assertGreater(end.duration, 0)

    async def test_a_run_handed_back_at_shutdown(self):
        task = await ScriptedTask.objects.acreate(steps=100, delay=0.05)
        recorder = Recorder()
        with self.assertLogs("streaming.tasks.runner", "INFO") as logs:
            node = Node(node_settings(SHUTDOWN_GRACE=0.0))
            node.runner.observer = recorder
            async with node:
                await wait_status(task, "running")
        await wait_status(task, "pending")
        found = self.recorded(recorder)
        self.assertEqual(
            value(found, "streaming_task_run_seconds_count", model=MODEL, outcome="handed_back"), 1
        )
        self.assertRegex(
            "\n".join(logs.output), rf"Task {MODEL}:{task.pk} handed_back \(attempt 1, [\d.]+ s\)"
        )


AUTH = [(b"authorization", f"Bearer {TOKEN}".encode())]
GAUGE = "streaming_cluster_tasks"


class ClusterCountTests(TransactionTestCase):
    """The count of task rows behind streaming_cluster_tasks: off the node's database
    thread (claims, renewals and the event log run there), one at a time."""

    async def test_a_count_runs_off_the_nodes_database_thread_and_closes_its_connection(self):
        await ScriptedTask.objects.acreate(status="created")  # not claimed: counted as created
        gate = threading.Event()
        seen = {}
        real_count = web_metrics.count_tasks

        def held_count():
            seen["thread"] = threading.get_ident()
            gate.wait(10)
            counts = real_count()
            seen["connection"] = connections["default"]  # the one the count used
            return counts

        async with serving(METRICS=True, METRICS_TOKEN=TOKEN) as (app, _port):
            with mock.patch.object(web_metrics, "count_tasks", held_count):
                scraping = asyncio.ensure_future(app.metrics.answer("GET", AUTH))
                try:
                    await eventually(lambda: "thread" in seen, message="the count to start")
                    # While the count runs, the node's database thread answers at once.
                    node_thread = await asyncio.wait_for(sync_to_async(threading.get_ident)(), 2)
                finally:
                    gate.set()
                reply = await scraping
        self.assertNotEqual(seen["thread"], node_thread)
        self.assertIsNone(seen["connection"].connection, "the count's connection was left open")
        self.assertIn(f'{GAUGE}{{model="{MODEL}",status="created"}} 1.0', reply.body)

    async def test_a_scrape_during_a_count_waits_for_it_and_starts_no_other(self):
        gate = threading.Event()
        started = []

        def held_count():
            started.append(1)
            gate.wait(10)
            return [((MODEL, "pending"), len(started))]  # the figures say which count it was

        async with serving(METRICS=True, METRICS_TOKEN=TOKEN, READY_TIMEOUT=0.5) as (app, _port):
            with (
                mock.patch.object(web_metrics, "count_tasks", held_count),
                self.assertLogs("streaming.web.metrics", "WARNING") as logs,
            ):
                try:
                    # The first count outlasts READY_TIMEOUT: no figures to answer with yet.
                    first = await app.metrics.answer("GET", AUTH)
                    # A scrape while it runs: it waits for that count, and starts none of its own.
                    joining = asyncio.ensure_future(app.metrics.answer("GET", AUTH))
                    for _ in range(5):
                        await asyncio.sleep(0)  # it reaches its wait
                    gate.set()
                    joined = await joining
                    self.assertEqual(len(started), 1, "a scrape started a count while one ran")
                    gate.clear()
                    # A second count, held: the answer has the first one's figures.
                    held = await app.metrics.answer("GET", AUTH)
                    self.assertEqual(len(started), 2)
                finally:
                    gate.set()
        self.assertEqual((first.status, joined.status, held.status), (200, 200, 200))
        self.assertNotIn(GAUGE, first.body)
        self.assertIn(f'{GAUGE}{{model="{MODEL}",status="pending"}} 1.0', joined.body)
        self.assertIn(f'{GAUGE}{{model="{MODEL}",status="pending"}} 1.0', held.body)
        self.assertEqual(len(logs.records), 2)
        self.assertIn("takes over READY_TIMEOUT (0.5 s); leaving them out", logs.output[0])
        self.assertIn("takes over READY_TIMEOUT (0.5 s); answering with the last count", logs.output[1])


# -- end to end ---------------------------------------------------------------------


def scrape(url: str, **headers) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = httpx.get(
        f"{url}/metrics", headers={"authorization": f"Bearer {TOKEN}", **headers}, timeout=10
    )
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def established(pid: int, port: int) -> int:
    """Connections to ``port`` that process ``pid`` holds open (Linux: /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


class RawStream:
    """A stream read over a raw socket in a thread: its status line and every body byte."""

    def __init__(self, url: str, path: str, headers: str = ""):
        port = int(url.rsplit(":", 1)[1])
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}\r\n".encode())
        self.data = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                self.data += chunk
        self.sock.close()

    def wait_closed(self, timeout=30):
        self.reader.join(timeout)
        assert not self.reader.is_alive(), f"stream still open: {self.data[-200:]!r}"
        return self

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1]) if b" " in self.data else 0

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""

    @property
    def ids(self) -> list[int]:
        return [int(m) for m in re.findall(rb"^id: (\d+)$", self.body, re.M)]


class ScrapeTests(ServerTestCase):
    """One server with METRICS on: a scrape says what the test did."""

    server_settings = {
        "metrics": True,
        "metrics_token": TOKEN,
        "max_streams_per_task": 3,
        "keepalive_interval": 120,  # no keep-alive comment among the counted bytes
    }

    def scrape(self):
        return scrape(self.server.url)

    def wait_metric(self, name, expected, **labels):
        return wait_for(
            lambda: value(self.scrape(), name, **labels) == expected,
            timeout=15,
            message=f"{name}{labels} == {expected} (last: {value(self.scrape(), name, **labels)})",
        )

    def test_streams_events_and_tasks_while_tasks_run_and_after(self):
        before = self.scrape()
        steps = 6
        task = ScriptedTask.objects.create(steps=steps, delay=0.3, status="created")
        path = task.get_stream_path()
        streams = [RawStream(self.server.url, path) for _ in range(3)]
        self.wait_metric("streaming_streams_open", 3)
        refused = RawStream(self.server.url, path).wait_closed()  # the limit set low: 3 per task
        self.assertEqual(refused.status, 503)
        samples = self.scrape()
        self.assertEqual(value(samples, "streaming_streams_refused_total", limit="per_task"), 1)
        self.assertEqual(value(samples, "streaming_cluster_tasks", model=MODEL, status="created"), 1)
        self.assertEqual(value(samples, "streaming_tasks_running", model=MODEL), 0)

        task.start()
        self.wait_metric("streaming_tasks_running", 1, model=MODEL)
        samples = self.scrape()  # while it runs and its streams are open
        self.assertEqual(value(samples, "streaming_cluster_tasks", model=MODEL, status="running"), 1)
        self.assertEqual(value(samples, "streaming_streams_open"), 3)

        for stream in streams:
            stream.wait_closed()
            self.assertEqual(stream.ids, list(range(1, steps + 2)))
        self.wait_metric("streaming_streams_open", 0)
        written = value(before, "streaming_eventlog_written_total") + steps  # the terminal one apart
        self.wait_metric("streaming_eventlog_written_total", written)
        after = self.scrape()

        def grew(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(grew("streaming_streams_opened_total"), 3)
        self.assertEqual(grew("streaming_events_published_total"), steps + 1)
        self.assertEqual(grew("streaming_events_delivered_total"), 3 * (steps + 1))
        self.assertEqual(grew("streaming_event_bytes_written_total"), sum(len(s.body) for s in streams))
        self.assertEqual(grew("streaming_resumes_total"), 0)
        self.assertEqual(grew("streaming_tasks_claimed_total", model=MODEL), 1)
        self.assertEqual(grew("streaming_task_run_seconds_count", model=MODEL, outcome="completed"), 1)
        self.assertGreaterEqual(grew("streaming_task_run_seconds_sum", model=MODEL, outcome="completed"), 1.5)
        self.assertEqual(grew("streaming_task_queue_wait_seconds_count", model=MODEL), 1)
        self.assertEqual(value(after, "streaming_cluster_tasks", model=MODEL, status="completed"), 1)
        self.assertEqual(value(after, "streaming_tasks_running", model=MODEL), 0)
        self.assertEqual(value(after, "streaming_eventlog_pending"), 0)
        self.assertEqual(value(after, "streaming_redis_outbox"), 0)

        with self.subTest("a resume"):
            resumed = RawStream(self.server.url, path, "last-event-id: 2\r\n").wait_closed()
            self.assertEqual(resumed.ids, list(range(3, steps + 2)))
            latest = self.scrape()
            self.assertEqual(
                value(latest, "streaming_resumes_total") - value(after, "streaming_resumes_total"), 1
            )
            self.assertEqual(
                value(latest, "streaming_events_delivered_total")
                - value(after, "streaming_events_delivered_total"),
                steps - 1,
            )

        with self.subTest("the run's log lines: key, attempt, duration"):
            log = self.server.log()
            self.assertRegex(
                log, rf"INFO .*Started {MODEL}:{task.pk} \(attempt 1, [\d.]+ s after it was created\)"
            )
            self.assertRegex(log, rf"INFO .*Task {MODEL}:{task.pk} completed \(attempt 1, [\d.]+ s\)")

    def test_a_failure_is_counted_and_logged_with_its_type(self):
        task = ScriptedTask.objects.create(steps=3, fail_at=2)
        self.wait_status(task, "failed")
        self.wait_metric("streaming_task_run_seconds_count", 1, model=MODEL, outcome="failed")
        log = self.server.log()
        self.assertRegex(log, rf"WARNING .*Task {MODEL}:{task.pk} failed: ValueError \(attempt 1, [\d.]+ s\)")
        self.assertIn(f"Task {MODEL}:{task.pk} failed\nTraceback", log)  # the traceback stays

    def test_connections(self):
        task = ScriptedTask.objects.create(steps=1, status="created")  # never started: streams stay open
        before = self.scrape()
        self.assertEqual(value(before, "streaming_connections_open"), 1)  # the scrape's own
        streams = [RawStream(self.server.url, task.get_stream_path()) for _ in range(2)]
        wait_for(lambda: all(b"\r\n\r\n" in stream.data for stream in streams), message="both streams' heads")
        during = self.scrape()  # a connection of its own, as each stream
        accepted = "streaming_connections_accepted_total"
        self.assertEqual(value(during, accepted) - value(before, accepted), 3)
        self.assertEqual(value(during, "streaming_connections_open"), 3)
        self.assertEqual(value(during, "streaming_streams_open"), 2)
        for stream in streams:
            stream.sock.shutdown(socket.SHUT_RDWR)
            stream.wait_closed()
        self.wait_metric("streaming_connections_open", 1)

    def test_who_may_read(self):
        url = f"{self.server.url}/metrics"
        anonymous = httpx.get(url)
        self.assertEqual(anonymous.status_code, 403)
        self.assertNotIn("streaming_", anonymous.text)
        wrong = httpx.get(url, headers={"authorization": "Bearer " + "x" * 40})
        self.assertEqual(wrong.status_code, 401)
        self.assertIn("Bearer", wrong.headers["www-authenticate"])
        self.assertNotIn("streaming_", wrong.text)
        good = httpx.get(url, headers={"authorization": f"Bearer {TOKEN}"})
        self.assertEqual(good.status_code, 200)
        self.assertIn("streaming_streams_open", good.text)
        self.assertEqual(good.headers["cache-control"], "no-store")
        self.assertTrue(good.headers["content-type"].startswith("text/plain; version="))
        self.assertEqual(httpx.post(url, headers={"authorization": f"Bearer {TOKEN}"}).status_code, 405)
        users = get_user_model()
        for name, staff, expected in (("staff", True, 200), ("someone", False, 403)):
            with self.subTest(name):
                self.client.force_login(users.objects.create_user(name, password="x", is_staff=staff))
                cookie = self.client.cookies[django_settings.SESSION_COOKIE_NAME].value
                answer = httpx.get(url, cookies={django_settings.SESSION_COOKIE_NAME: cookie})
                self.assertEqual(answer.status_code, expected)


class MetricsOffTests(ServerTestCase):
    def test_the_path_is_the_projects(self):
        response = httpx.get(f"{self.server.url}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        self.assertEqual(response.status_code, 404)
        self.assertNotIn("streaming_", response.text)


class WithoutPrometheusClientTests(TransactionTestCase):
    async def test_the_endpoint_says_what_to_install_and_streams_go_on(self):
        with mock.patch.dict(sys.modules, {"prometheus_client": None}):
            async with (
                serving(METRICS=True, METRICS_TOKEN=TOKEN) as (_app, port),
                httpx.AsyncClient() as client,
            ):
                anonymous = await client.get(f"http://127.0.0.1:{port}/metrics")
                scraper = await client.get(
                    f"http://127.0.0.1:{port}/metrics", headers={"authorization": f"Bearer {TOKEN}"}
                )
                health = await client.get(f"http://127.0.0.1:{port}/health")
        self.assertEqual(anonymous.status_code, 403)  # nothing said before who asks is known
        self.assertEqual(scraper.status_code, 503)
        self.assertIn("pip install 'django-streaming-coordinator[metrics]'", scraper.text)
        self.assertEqual(health.status_code, 200)


class WorkersMetricsTests(TransactionTestCase):
    """``--workers 2``: a scrape reaches one worker and answers for both."""

    def setUp(self):
        if not distributed_mode():
            if os.environ.get("STREAMING_REQUIRE_DISTRIBUTED") == "1":
                raise AssertionError(f"STREAMING_REQUIRE_DISTRIBUTED=1 but {HOW}")
            raise unittest.SkipTest(HOW)
        # Two tasks at most per worker: four running tasks are on both.
        self.server = ServerProcess(
            workers=2, metrics=True, metrics_token=TOKEN, max_concurrent_tasks=2, keepalive_interval=120
        ).start()
        self.addCleanup(self.server.stop)
        wait_for(lambda: self.server.log().count("Streaming node started") == 2, message="both workers")

    def test_figures_are_summed_across_workers(self):
        shared_dir = Path(re.search(r"figures meet in (\S+)", self.server.log())[1])
        self.assertTrue(shared_dir.is_dir())
        before = scrape(self.server.url)
        steps = 8
        tasks = [ScriptedTask.objects.create(steps=steps, delay=0.5, status="created") for _ in range(4)]
        streams = [RawStream(self.server.url, task.get_stream_path()) for task in tasks for _ in range(2)]
        wait_for(lambda: value(scrape(self.server.url), "streaming_streams_open") == 8, timeout=15)
        for task in tasks:
            task.start()

        def owners():
            rows = ScriptedTask.objects.filter(pk__in=[t.pk for t in tasks], status="running")
            return {row.lease_owner.split(":")[1] for row in rows if row.lease_owner}

        wait_for(lambda: len(owners()) == 2, timeout=15, message="tasks running on both workers")
        wait_for(
            lambda: value(scrape(self.server.url), "streaming_tasks_running", model=MODEL) == 4,
            timeout=15,
            message="4 running tasks, 2 in each worker, in one scrape",
        )
        for stream in streams:
            stream.wait_closed(60)
            self.assertEqual(stream.ids, list(range(1, steps + 2)))

        def settled():
            samples = scrape(self.server.url)
            return (
                value(samples, "streaming_eventlog_written_total")
                - value(before, "streaming_eventlog_written_total")
                == 4 * steps  # the terminal events are written with the final status, apart
                and value(samples, "streaming_streams_open") == 0
            )

        wait_for(settled, timeout=15, message="the workers' last counts published")
        for _ in range(6):  # whichever worker answers, the same sums
            after = scrape(self.server.url)

            def grew(name, after=after, **labels):
                return value(after, name, **labels) - value(before, name, **labels)

            self.assertEqual(grew("streaming_tasks_claimed_total", model=MODEL), 4)
            self.assertEqual(grew("streaming_events_published_total"), 4 * (steps + 1))
            self.assertEqual(grew("streaming_streams_opened_total"), 8)
            self.assertEqual(grew("streaming_events_delivered_total"), 8 * (steps + 1))
            self.assertEqual(grew("streaming_event_bytes_written_total"), sum(len(s.body) for s in streams))
            self.assertEqual(grew("streaming_task_run_seconds_count", model=MODEL, outcome="completed"), 4)
            self.assertEqual(value(after, "streaming_cluster_tasks", model=MODEL, status="completed"), 4)
            self.assertEqual(value(after, "streaming_tasks_running", model=MODEL), 0)
        self.server.stop()
        self.assertFalse(shared_dir.exists(), "the supervisor removes the workers' shared directory")

    def test_a_dead_workers_gauges_go_and_its_counts_stay(self):
        task = ScriptedTask.objects.create(steps=1, status="created")  # never started: streams stay open
        streams = [RawStream(self.server.url, task.get_stream_path()) for _ in range(6)]
        wait_for(lambda: value(scrape(self.server.url), "streaming_streams_open") == 6, timeout=15)
        opened = value(scrape(self.server.url), "streaming_streams_opened_total")
        started = re.findall(r"Streaming node started \([^:]+:(\d+):", self.server.log())
        workers = {int(pid) for pid in started}
        victim = max(workers, key=lambda pid: established(pid, self.server.port))  # one that holds streams
        self.assertGreater(established(victim, self.server.port), 0)
        os.kill(victim, signal.SIGKILL)
        restarted = lambda: self.server.log().count("Streaming node started") == 3  # noqa: E731
        wait_for(restarted, timeout=30, message="a new worker")

        def open_now():
            return sum(stream.reader.is_alive() for stream in streams)

        wait_for(lambda: open_now() < 6, timeout=10, message="the dead worker's streams closed")
        wait_for(
            lambda: value(scrape(self.server.url), "streaming_streams_open") == open_now(),
            timeout=15,
            message="open streams: only the live workers'",
        )
        self.assertEqual(value(scrape(self.server.url), "streaming_streams_opened_total"), opened)
