"""TaskStream, AsyncTaskStream and stream_client.py against a real runserver_stream subprocess."""

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import httpx
from django.db import connection
from django.test import TransactionTestCase

from demo.models import ContinueTask, ExampleTask
from streaming.access import stream_token
from streaming.client import (
    AccessExpired,
    AsyncMultiStream,
    AsyncTaskStream,
    Event,
    MultiStream,
    StreamHTTPError,
    TaskCancelled,
    TaskFailed,
    TaskStream,
)
from streaming.models import TaskEvent
from streaming.tests.testapp.models import FragileTask, PrivateTask, ScriptedTask

from .servercase import ServerTestCase
from .support import REPO, ServerProcess, subprocess_env
from .tcpproxy import TcpProxy

KINDS = ("sync", "async")
RULE = "=" * 60


def drive(
    kind: str,
    url: str,
    *,
    on_event: Callable[[Event], None] | None = None,
    **kwargs: Any,
) -> tuple[list[Event], Any]:
    """Read the stream with TaskStream or AsyncTaskStream, then ``result()``:
    (the events, the value or the exception raised). ``on_event`` runs (blocking)
    after each event."""
    events: list[Event] = []
    if kind == "sync":
        with TaskStream(url, **kwargs) as sync_stream:
            try:
                for event in sync_stream:
                    events.append(event)
                    if on_event:
                        on_event(event)
                return events, sync_stream.result()
            except Exception as exc:
                return events, exc

    async def read() -> Any:
        async with AsyncTaskStream(url, **kwargs) as async_stream:
            try:
                async for event in async_stream:
                    events.append(event)
                    if on_event:
                        on_event(event)
                return await async_stream.result()
            except Exception as exc:
                return exc

    return events, asyncio.run(read())


def in_thread(function: Callable[[], object]) -> None:
    """Run ``function`` (ORM calls) in a thread of its own, and wait for it."""

    def run() -> None:
        try:
            function()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)


def int_ids(events: list[Event]) -> list[int]:
    return [int(event.id) for event in events if event.id is not None]


class TaskStreamTests(ServerTestCase):
    def each_kind(self):
        for kind in KINDS:
            with self.subTest(kind):
                yield kind

    def test_events_and_result_are_the_tasks(self):
        for returned in (5, {"rows": 2}, None, {"result": 3}, {}, [1, "x"]):
            task = ScriptedTask.objects.create(steps=2, result=returned)
            for kind in KINDS:
                with self.subTest(returned=returned, kind=kind):
                    events, outcome = drive(kind, self.server.url, model="ScriptedTask", task_id=task.pk,
                                            last_event_id=0)  # fmt: skip
                    self.assertEqual(outcome, returned)
                    self.assertEqual([e.type for e in events], ["step", "step", "complete"])
                    self.assertEqual(int_ids(events), [e.seq for e in self.logged(task)])
                    self.assertEqual(events[0].task, ("ScriptedTask", str(task.pk)))

    def test_a_failed_task_raises_task_failed(self):
        task = FragileTask.objects.create(steps=3, fail_at=2)
        for kind in self.each_kind():
            events, outcome = drive(kind, self.url(task), last_event_id=0)
            self.assertEqual([e.type for e in events], ["step", "error"])
            self.assertIsInstance(outcome, TaskFailed)
            self.assertEqual(
                (outcome.error_type, outcome.message), ("ValueError", "failing at step 2 as scripted")
            )

    def test_a_cancelled_task_raises_task_cancelled(self):
        for kind in self.each_kind():
            task = ContinueTask.objects.create(poll_interval=0.05)

            def cancel(event: Event, task=task) -> None:
                if event.type == "started":
                    in_thread(task.cancel)  # the async kind calls this inside its event loop

            events, outcome = drive(kind, self.url(task), on_event=cancel)
            self.assertEqual([e.type for e in events], ["started", "cancelled"])
            self.assertIsInstance(outcome, TaskCancelled)

    def test_a_finished_task_answers_204_and_result_reads_its_status(self):
        done = ScriptedTask.objects.create(steps=1, result={"result": 9})
        failed = FragileTask.objects.create(steps=2, fail_at=1)
        self.wait_status(done, "completed")
        self.wait_status(failed, "failed")
        for kind in self.each_kind():
            last = self.logged(done)[-1].seq
            events, outcome = drive(kind, self.url(done), last_event_id=last)
            self.assertEqual((events, outcome), ([], {"result": 9}))
            events, outcome = drive(kind, self.url(failed), last_event_id=self.logged(failed)[-1].seq)
            self.assertEqual(events, [])
            self.assertIsInstance(outcome, TaskFailed)
            self.assertEqual(str(outcome), "ValueError: failing at step 1 as scripted")

    def test_a_missing_task_is_a_final_404(self):
        for kind in self.each_kind():
            started = time.monotonic()
            _, outcome = drive(kind, f"{self.server.url}/stream/ScriptedTask/999999")
            self.assertIsInstance(outcome, StreamHTTPError)
            self.assertEqual(str(outcome), "HTTP 404: ScriptedTask 999999 not found")
            self.assertLess(time.monotonic() - started, 2.0)  # no reconnects

    def test_a_protected_task_streams_with_its_token(self):
        task = PrivateTask.objects.create(steps=2, result=4)
        other = PrivateTask.objects.create(steps=1)
        for kind in self.each_kind():
            events, outcome = drive(kind, self.url(task), token=task.stream_token(), last_event_id=0)
            self.assertEqual(([e.type for e in events], outcome), (["step", "step", "complete"], 4))
            _, refused = drive(kind, self.url(task))
            self.assertIsInstance(refused, StreamHTTPError)
            self.assertEqual(refused.status_code, 403)
            self.assertIn(f"Not allowed to watch PrivateTask {task.pk}", refused.message)
            _, wrong = drive(kind, self.url(task), token=other.stream_token())
            self.assertEqual(wrong.status_code, 403)

    def test_a_token_that_expires_mid_stream_ends_with_access_expired_and_resumes_with_a_new_one(self):
        for kind in self.each_kind():
            task = PrivateTask.objects.create(steps=60, delay=0.05, result="done")  # 3 s: outlives the token
            events, outcome = drive(
                kind, self.url(task), token=task.stream_token(expires_in=1), last_event_id=0
            )
            self.assertIsInstance(outcome, AccessExpired)
            self.assertTrue(events)
            self.assertEqual(outcome.last_event_id, events[-1].id)
            self.assertIn("resume after event", str(outcome))
            more, value = drive(
                kind, self.url(task), token=task.stream_token(), last_event_id=outcome.last_event_id
            )
            self.assertEqual(value, "done")
            self.assertEqual(int_ids(events + more), [e.seq for e in self.logged(task)])


def read_many(
    kind: str, base_url: str, *, on_event: Callable[[Event], bool | None] | None = None, **kwargs: Any
) -> tuple[list[Event], Any, Any]:
    """Read a multiplexed stream with MultiStream or AsyncMultiStream: (the events,
    the exception raised or None, the stream). ``on_event`` runs (blocking) after
    each event; True leaves the stream."""
    events: list[Event] = []
    if kind == "sync":
        with MultiStream(base_url, **kwargs) as sync_stream:
            try:
                for event in sync_stream:
                    events.append(event)
                    if on_event and on_event(event):
                        break
            except Exception as exc:
                return events, exc, sync_stream
            return events, None, sync_stream

    async def read() -> Any:
        async with AsyncMultiStream(base_url, **kwargs) as async_stream:
            try:
                async for event in async_stream:
                    events.append(event)
                    if on_event and on_event(event):
                        break
            except Exception as exc:
                return exc, async_stream
            return None, async_stream

    problem, read_stream = asyncio.run(read())
    return events, problem, read_stream


def logged_ids(task) -> list[int]:
    rows = TaskEvent.objects.filter(task_type=task._meta.label_lower, task_id=str(task.pk)).order_by("seq")
    return [row.seq for row in rows]


def ids_of(events: list[Event], task) -> list[int]:
    return [int(e.id) for e in events if e.task == (type(task).stream_name(), str(task.pk))]


class MultiStreamTests(ServerTestCase):
    def test_several_tasks_on_one_connection_each_complete(self):
        for kind in KINDS:
            with self.subTest(kind):
                first = ScriptedTask.objects.create(steps=4, delay=0.02, result=1)
                second = ScriptedTask.objects.create(steps=6, delay=0.01)
                events, problem, read = read_many(
                    kind,
                    self.server.url,
                    tasks=[f"ScriptedTask/{first.pk}", ("testapp/ScriptedTask", second.pk)],
                    history=True,
                )
                self.assertIsNone(problem)
                self.assertTrue(read.ended)
                for task in (first, second):
                    self.assertEqual(ids_of(events, task), logged_ids(task))
                    self.assertEqual(read.terminals[("ScriptedTask", str(task.pk))].type, "complete")

    def test_a_feed_brings_running_and_later_tasks(self):
        for kind in KINDS:
            with self.subTest(kind):
                running = ScriptedTask.objects.create(steps=400, delay=0.05)
                self.wait_logged(running, 2)
                later: list[ScriptedTask] = []

                def follow(event: Event, running=running, later=later) -> bool:
                    if not later:  # the feed is open: the running task came
                        in_thread(lambda: later.append(ScriptedTask.objects.create(steps=3, delay=0.01)))
                    return bool(later) and event.task == ("ScriptedTask", str(later[0].pk)) and event.terminal

                events, problem, read = read_many(
                    kind, self.server.url, feeds=["ScriptedTask"], on_event=follow
                )
                in_thread(lambda running=running: running.cancel())
                self.assertIsNone(problem)
                self.assertFalse(read.ended)
                self.assertEqual(ids_of(events, later[0]), [1, 2, 3, 4])  # from its run's first event
                self.assertGreaterEqual(ids_of(events, running)[0], 2)  # a running task joins at its latest

    def test_a_token_names_several_protected_tasks(self):
        first = PrivateTask.objects.create(steps=2)
        second = PrivateTask.objects.create(steps=1)
        names = [f"PrivateTask/{first.pk}", f"PrivateTask/{second.pk}"]
        for kind in self.each_kind():
            _, problem, _ = read_many(kind, self.server.url, tasks=names, token=stream_token([first]))
            self.assertIsInstance(problem, StreamHTTPError)
            self.assertEqual(problem.status_code, 403)
            events, problem, read = read_many(
                kind, self.server.url, tasks=names, token=stream_token([first, second]), history=True
            )
            self.assertIsNone(problem)
            self.assertEqual(len(read.terminals), 2)
            self.assertEqual(
                (ids_of(events, first), ids_of(events, second)), (logged_ids(first), logged_ids(second))
            )

    def each_kind(self):
        for kind in KINDS:
            with self.subTest(kind):
                yield kind


class DropTests(ServerTestCase):
    """A real server behind a TCP proxy that cuts or stalls the connections."""

    def proxy(self) -> TcpProxy:
        proxy = TcpProxy("127.0.0.1", self.server.port).start()
        self.addCleanup(proxy.stop)
        return proxy

    def test_connections_cut_mid_stream_resume_without_loss_or_repetition(self):
        for kind in KINDS:
            with self.subTest(kind):
                proxy = self.proxy()
                # A dict: the complete event settles the value, no status request.
                task = ScriptedTask.objects.create(steps=40, delay=0.03, result={"ok": 1})

                def cut(event: Event, proxy=proxy) -> None:
                    if event.id in ("5", "15", "25"):
                        proxy.reset()

                events, outcome = drive(
                    kind, f"http://127.0.0.1:{proxy.port}{task.get_stream_path()}", last_event_id=0,
                    retry=0.05, on_event=cut,
                )  # fmt: skip
                self.assertEqual(outcome, {"ok": 1})
                self.assertEqual(int_ids(events), logged_ids(task))
                self.assertEqual(proxy.connections, 4)  # three cuts, three reconnects

    def test_a_multiplexed_stream_cut_mid_stream_resumes_each_task(self):
        for kind in KINDS:
            with self.subTest(kind):
                proxy = self.proxy()
                tasks = [ScriptedTask.objects.create(steps=20, delay=0.03) for _ in range(3)]
                seen: list[Event] = []

                def cut(event: Event, proxy=proxy, seen=seen) -> None:
                    seen.append(event)
                    if len(seen) in (7, 20, 33):
                        proxy.reset()

                names = [f"ScriptedTask/{task.pk}" for task in tasks]
                events, problem, read = read_many(
                    kind,
                    f"http://127.0.0.1:{proxy.port}",
                    tasks=names,
                    history=True,
                    retry=0.05,
                    on_event=cut,
                )
                self.assertIsNone(problem)
                self.assertTrue(read.ended)
                for task in tasks:
                    self.assertEqual(ids_of(events, task), logged_ids(task))
                self.assertEqual(proxy.connections, 4)

    def test_a_read_timeout_turns_a_silent_connection_into_a_reconnect(self):
        # A stalled network (a NAT that forgot the connection) sends nothing,
        # not even keep-alives: with a read timeout the client tries again
        # until the network heals.
        for kind in KINDS:
            with self.subTest(kind):
                proxy = self.proxy()
                task = ScriptedTask.objects.create(steps=30, delay=0.05)
                healer = threading.Timer(2.5, proxy.heal)
                self.addCleanup(healer.cancel)

                def stall(event: Event, proxy=proxy, healer=healer) -> None:
                    if event.id == "3":
                        proxy.stall()
                        healer.start()

                events, outcome = drive(
                    kind, f"http://127.0.0.1:{proxy.port}{task.get_stream_path()}", last_event_id=0,
                    retry=0.05, timeout=httpx.Timeout(5.0, read=0.5), on_event=stall,
                )  # fmt: skip
                self.assertIsNone(outcome)
                self.assertEqual(int_ids(events), logged_ids(task))
                self.assertGreater(proxy.connections, 1)


class RestartTests(TransactionTestCase):
    def test_resumes_across_a_server_restart_without_loss_or_repetition(self):
        for kind in KINDS:
            with self.subTest(kind):
                self.restart_under(kind)

    def restart_under(self, kind: str) -> None:
        server = ServerProcess().start()
        self.addCleanup(server.stop)
        task = ScriptedTask.objects.create(steps=40, delay=0.05, result="finished")
        waits: list[float] = []
        real_sleep, real_asleep = time.sleep, asyncio.sleep

        def restart(event: Event) -> None:
            if event.id == "3":
                server.stop()  # graceful: streams get "retry: 1000"; the task goes back to pending
                server.start()

        async def asleep(seconds: float) -> None:
            waits.append(seconds)
            await real_asleep(seconds)

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            real_sleep(seconds)

        with (
            mock.patch("streaming.client.sync.sleep", sleep),
            mock.patch("streaming.client.aio.sleep", asleep),
        ):
            events, outcome = drive(
                kind, f"{server.url}{task.get_stream_path()}", last_event_id=0, on_event=restart
            )
        self.assertEqual(outcome, "finished")
        got = int_ids(events)
        self.assertEqual(got, sorted(set(got)), "ids strictly increase: nothing twice")
        logged = TaskEvent.objects.filter(task_type=task._meta.label_lower, task_id=str(task.pk)).order_by(
            "seq"
        )
        self.assertEqual(got, [e.seq for e in logged], "every logged event, in order: nothing lost")
        self.assertIn("retry", [e.type for e in events])  # the second attempt's first event
        self.assertEqual(len(waits), 1, waits)
        self.assertTrue(1.0 <= waits[0] <= 1.5, f"the server's retry: 1000, jittered: {waits}")
        server.stop()

    def test_a_multiplexed_stream_resumes_each_task_across_a_restart(self):
        for kind in KINDS:
            with self.subTest(kind):
                server = ServerProcess().start()
                self.addCleanup(server.stop)
                tasks = [ScriptedTask.objects.create(steps=30, delay=0.05) for _ in range(3)]
                restarted: list[bool] = []

                def restart(event: Event, server=server, restarted=restarted) -> None:
                    if not restarted and event.id is not None and int(event.id) >= 3:
                        restarted.append(True)
                        server.stop()
                        server.start()

                names = [f"ScriptedTask/{task.pk}" for task in tasks]
                events, problem, read = read_many(
                    kind, server.url, tasks=names, history=True, on_event=restart
                )
                self.assertIsNone(problem)
                self.assertTrue(restarted)
                self.assertTrue(read.ended)
                for task in tasks:
                    got = ids_of(events, task)
                    self.assertEqual(got, logged_ids(task), "every event of each task once, in order")
                    self.assertIn(
                        "retry", [e.type for e in events if e.task == ("ScriptedTask", str(task.pk))]
                    )
                server.stop()


class StreamClientOptionTests(ServerTestCase):
    def run_client(self, *args: str, prelude: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
        code = f"{prelude}import runpy, sys; sys.argv = ['stream_client.py', *sys.argv[1:]]; " \
               "runpy.run_path('stream_client.py', run_name='__main__')"  # fmt: skip
        return subprocess.run(
            [sys.executable, "-c", code, *args, "--port", str(self.server.port)],
            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def test_progress_draws_a_bar_to_total_over_total(self):
        task = ExampleTask.objects.create(step_delay=0.3, status="created")
        client = subprocess.Popen(
            [sys.executable, "stream_client.py", "ExampleTask", str(task.pk), "--port", str(self.server.port),
             "--progress"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
        )  # fmt: skip
        self.addCleanup(client.kill)
        header = "".join(client.stdout.readline() for _ in range(4))
        self.assertEqual(
            header, f"{RULE}\nConnecting to: {self.server.url}/stream/ExampleTask/{task.pk}\n{RULE}\n\n"
        )
        time.sleep(0.5)  # the header is printed just before connecting
        task.start()
        out, err = client.communicate(timeout=60)
        self.assertEqual((client.returncode, err), (0, ""))
        bar, footer = out.rsplit("\n\n", 1)
        self.assertEqual(footer, f"{RULE}\nStream ended with: COMPLETE\nTotal events received: 5\n{RULE}\n")
        frames = [frame for frame in re.split(r"[\r\n]", bar) if frame.strip()]
        self.assertIn("Step 1 of 3", "".join(frames))
        self.assertRegex(frames[-1], r"^Task completed successfully: 100%\|.*\| 3/3 ")
        self.assertNotIn("Event:", out)

    def test_progress_without_tqdm_says_what_to_install(self):
        result = self.run_client(
            "ExampleTask", "1", "--progress", prelude="import sys; sys.modules['tqdm'] = None; "
        )
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, "")
        self.assertEqual(
            result.stderr,
            "Error: --progress needs tqdm: pip install 'django-streaming-coordinator[progress]'\n",
        )

    def test_token_opens_a_protected_task(self):
        task = PrivateTask.objects.create(steps=1)
        self.wait_status(task, "completed")
        allowed = self.run_client("PrivateTask", str(task.pk), "--token", task.stream_token())
        self.assertEqual(allowed.returncode, 0, allowed.stderr)
        self.assertIn("[1] Event: COMPLETE\n", allowed.stdout)
        self.assertIn("Stream ended with: COMPLETE\n", allowed.stdout)
        refused = self.run_client("PrivateTask", str(task.pk))
        self.assertEqual(refused.returncode, 1)
        self.assertEqual(
            refused.stderr,
            f"Error: HTTP 403: Not allowed to watch PrivateTask {task.pk}: sign in as a user who may, "
            "or use a stream token\n",
        )
