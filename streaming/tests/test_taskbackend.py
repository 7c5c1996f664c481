"""The django.tasks backend (issue 12): @task functions on our runners, used the way
Django's tasks docs use tasks. Runs on Django 6 (django.tasks) and on 5.2 (the
django-tasks backport) alike: nothing here is skipped on either line."""

import asyncio
import dataclasses
import json
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
from datetime import timedelta
from pathlib import Path

from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.test import TestCase, TransactionTestCase, override_settings
from django.utils import timezone

try:
    from django.tasks import TaskResultStatus, default_task_backend, task_backends
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist, TaskResultMismatch
    from django.tasks.signals import task_enqueued, task_finished, task_started
except ImportError:  # Django 5.2: the backport
    from django_tasks import TaskResultStatus, default_task_backend, task_backends
    from django_tasks.exceptions import InvalidTaskError as InvalidTask
    from django_tasks.exceptions import TaskResultDoesNotExist, TaskResultMismatch
    from django_tasks.signals import task_enqueued, task_finished, task_started

from streaming.access import read_token
from streaming.keys import TaskKey
from streaming.models import EnqueuedTask
from streaming.taskbackend import StreamingTaskBackend, StreamingTaskResult
from streaming.taskbackend.compat import FRAMEWORK
from streaming.tasks import store
from streaming.tasks.registry import stream_models

from . import jobs
from .servercase import ServerTestCase
from .support import ServerProcess, eventually, manage, read_stream, serving, wait_for

INTERRUPTED = "streaming.taskbackend.current.TaskInterrupted"
CANCELLED = "streaming.taskbackend.current.TaskCancelled"


def wait_result(result, *statuses, timeout=15.0):
    def reached():
        result.refresh()
        return result.status in statuses

    wait_for(reached, timeout=timeout, message=f"task {result.id} to be {statuses}")
    return result


class BackendTests(TestCase):
    """The framework's contract, in this process (no runner: tasks stay READY)."""

    def test_the_setting_makes_it_the_default_backend(self):
        backend = task_backends["default"]
        self.assertIsInstance(backend, StreamingTaskBackend)
        for feature in ("supports_defer", "supports_async_task", "supports_get_result", "supports_priority"):
            self.assertTrue(getattr(backend, feature), feature)

    def test_enqueue_from_a_test_returns_a_ready_result(self):
        result = jobs.add.enqueue(2, b=3)
        self.assertIsInstance(result, StreamingTaskResult)
        self.assertEqual(result.status, TaskResultStatus.READY)
        self.assertEqual((result.args, result.kwargs), ([2], {"b": 3}))
        self.assertEqual(result.backend, "default")
        self.assertIsNotNone(result.enqueued_at)
        self.assertIsNone(result.started_at)
        self.assertEqual((result.errors, result.worker_ids, result.attempts), ([], [], 0))
        self.assertFalse(result.is_finished)
        with self.assertRaisesMessage(ValueError, "not finished"):
            result.return_value  # noqa: B018
        row = EnqueuedTask.objects.get(pk=result.id)
        self.assertEqual((row.task_path, row.status), ("streaming.tests.jobs.add", "pending"))

    def test_get_result_reads_the_row_back(self):
        result = jobs.stamp.using(priority=7, queue_name="reports").enqueue("x")
        again = jobs.stamp.get_result(result.id)
        self.assertEqual(again.id, result.id)
        self.assertEqual(again.task.func, jobs.stamp.func)
        self.assertEqual((again.task.priority, again.task.queue_name), (7, "reports"))
        self.assertEqual(again.args, ["x"])
        self.assertEqual(async_to_sync(default_task_backend.aget_result)(result.id).id, result.id)
        with self.assertRaises(TaskResultMismatch):
            jobs.add.get_result(result.id)

    def test_aenqueue(self):
        result = async_to_sync(jobs.count_async.aenqueue)(2)
        self.assertEqual(EnqueuedTask.objects.get(pk=result.id).task_path, "streaming.tests.jobs.count_async")

    def test_unknown_result_ids(self):
        for result_id in ("999999", "abc", "-1", ""):
            with self.subTest(result_id=result_id), self.assertRaises(TaskResultDoesNotExist):
                default_task_backend.get_result(result_id)
        with self.assertRaises(TaskResultDoesNotExist):
            default_task_backend.cancel("999999")

    def test_validate_task(self):
        future = timezone.now() + timedelta(hours=1)
        with self.assertRaisesMessage(InvalidTask, "Queue 'nowhere'"):
            jobs.add.using(queue_name="nowhere")
        with self.assertRaisesMessage(InvalidTask, "priority"):
            jobs.add.using(priority=101)
        with self.assertRaisesMessage(InvalidTask, "aware"):
            jobs.add.using(run_after=future.replace(tzinfo=None))
        with self.assertRaisesMessage(InvalidTask, "recovery"):
            dataclasses.replace(jobs.add, recovery="sometimes")
        with self.assertRaisesMessage(InvalidTask, "max_attempts"):
            dataclasses.replace(jobs.add, max_attempts=0)
        with self.assertRaisesMessage(TypeError, "JSON"):
            jobs.add.enqueue(object(), 1)
        self.assertFalse(EnqueuedTask.objects.exists())

    def test_backend_options_are_checked(self):
        with self.assertRaisesMessage(ImproperlyConfigured, "RECOVERY"):
            StreamingTaskBackend("x", {"OPTIONS": {"RECOVERY": "maybe"}})
        with self.assertRaisesMessage(ImproperlyConfigured, "MAX_ATTEMPTS"):
            StreamingTaskBackend("x", {"OPTIONS": {"MAX_ATTEMPTS": True}})
        with self.assertRaisesMessage(ImproperlyConfigured, "unknown option"):
            StreamingTaskBackend("x", {"OPTIONS": {"RETRIES": 3}})

    def test_recovery_policy_per_task_and_per_backend(self):
        retried = jobs.survive_a_crash.enqueue(1)
        plain = jobs.add.enqueue(1, 2)
        self.assertEqual(
            EnqueuedTask.objects.filter(pk=retried.id).values_list("recovery", "max_attempts").get(),
            ("retry", 3),
        )
        self.assertEqual(
            EnqueuedTask.objects.filter(pk=plain.id).values_list("recovery", "max_attempts").get(),
            ("fail", 3),
        )
        backend = StreamingTaskBackend("default", {"OPTIONS": {"RECOVERY": "retry", "MAX_ATTEMPTS": 5}})
        row = backend._row(jobs.add, [1, 2], {})
        self.assertEqual((row["recovery"], row["max_attempts"]), ("retry", 5))

    def test_task_enqueued_signal(self):
        received = []

        def receiver(sender, task_result, **kwargs):
            received.append((sender, task_result))

        task_enqueued.connect(receiver)
        self.addCleanup(task_enqueued.disconnect, receiver)
        result = jobs.add.enqueue(1, 1)
        self.assertEqual([(sender, r.id) for sender, r in received], [(StreamingTaskBackend, result.id)])

    def test_stream_url_carries_a_token_for_this_task_only(self):
        result = jobs.add.enqueue(1, 1)
        path, _, token = result.stream_url(expires_in=60).partition("?token=")
        self.assertEqual(path, f"/stream/EnqueuedTask/{result.id}")
        grant = read_token(token)
        self.assertEqual(grant.keys, {TaskKey(EnqueuedTask._meta.label_lower, result.id)})
        self.assertLessEqual(grant.expires_at, time.time() + 61)

    def test_statuses_map_onto_the_frameworks_four(self):
        result = jobs.add.enqueue(1, 1)
        row = EnqueuedTask.objects.get(pk=result.id)
        cases = {
            "created": TaskResultStatus.READY,
            "pending": TaskResultStatus.READY,
            "running": TaskResultStatus.RUNNING,
            "completed": TaskResultStatus.SUCCESSFUL,
            "failed": TaskResultStatus.FAILED,
            "cancelled": TaskResultStatus.FAILED,
        }
        for ours, theirs in cases.items():
            with self.subTest(ours):
                EnqueuedTask.objects.filter(pk=row.pk).update(status=ours, attempts=1, final_value=2)
                result.refresh()
                self.assertEqual((result.status, result.stream_status), (theirs, ours))
        EnqueuedTask.objects.filter(pk=row.pk).update(status="completed")
        result.refresh()
        self.assertEqual(result.return_value, 2)
        EnqueuedTask.objects.filter(pk=row.pk).update(status="failed", error="Task interrupted: ...")
        result.refresh()
        self.assertEqual([e.exception_class_path for e in result.errors], [INTERRUPTED])
        with self.assertRaisesMessage(ValueError, "failed"):
            result.return_value  # noqa: B018

    def test_run_again_is_a_new_result_with_a_history_of_its_own(self):
        result = jobs.add.enqueue(2, 3)
        EnqueuedTask.objects.filter(pk=result.id).update(
            status="failed",
            attempts=2,
            first_started_at=timezone.now(),
            worker_ids=["node-a", "node-b"],
            errors=[{"attempt": 2, "exception_class_path": "builtins.ValueError", "traceback": "..."}],
        )
        again = EnqueuedTask.objects.get(pk=result.id).rerun()
        new = default_task_backend.get_result(str(again.pk))
        self.assertEqual((new.status, new.args, new.attempts), (TaskResultStatus.READY, [2, 3], 0))
        self.assertEqual((new.errors, new.worker_ids, new.started_at), ([], [], None))
        old = default_task_backend.get_result(result.id)  # keeps its own
        self.assertIn("builtins.ValueError", [e.exception_class_path for e in old.errors])

    def test_cancel_before_a_runner_takes_it(self):
        result = jobs.add.enqueue(1, 1)
        self.assertEqual(result.cancel(), "pending")  # a runner ends it as cancelled, without running it
        self.assertTrue(EnqueuedTask.objects.get(pk=result.id).cancel_requested)

    def test_send_event_outside_a_run_does_nothing(self):
        # The same function works under any backend, or called directly.
        self.assertEqual(jobs.count_sync.call(2), {"counted": 2})
        self.assertEqual(async_to_sync(jobs.count_async.acall)(2), {"counted": 2})

    def test_the_table_costs_nothing_where_tasks_name_another_backend(self):
        self.assertIn(EnqueuedTask, stream_models())
        with override_settings(TASKS={"default": {"BACKEND": f"{FRAMEWORK}.backends.dummy.DummyBackend"}}):
            self.assertNotIn(EnqueuedTask, stream_models())
        self.assertIn(EnqueuedTask, stream_models())


class InProcessTests(TransactionTestCase):
    """A node in this process: the framework's signals reach this process's receivers."""

    def test_task_started_and_task_finished_signals(self):
        seen = []

        def record(signal_name):
            def receiver(sender, task_result, **kwargs):
                seen.append((signal_name, sender, task_result.id, task_result.status))

            return receiver

        receivers = [(task_started, record("started")), (task_finished, record("finished"))]
        for signal, receiver in receivers:
            signal.connect(receiver, weak=False)
            self.addCleanup(signal.disconnect, receiver)

        async def scenario():
            async with serving():
                ok = await jobs.count_async.aenqueue(1)
                bad = await jobs.fail.aenqueue("no")
                for result in (ok, bad):
                    await wait_async(result)
                # task_finished follows the stored end (the test may see the row first)
                await eventually(
                    lambda: sum(name == "finished" for name, *_ in seen) == 2, message="finished"
                )
                return ok, bad

        ok, bad = async_to_sync(scenario)()
        self.assertIn(("started", StreamingTaskBackend, ok.id, TaskResultStatus.RUNNING), seen)
        self.assertIn(("finished", StreamingTaskBackend, ok.id, TaskResultStatus.SUCCESSFUL), seen)
        self.assertIn(("finished", StreamingTaskBackend, bad.id, TaskResultStatus.FAILED), seen)
        # finished comes after started, and when it comes the result is stored
        order = [(name, rid) for name, _, rid, _ in seen]
        self.assertLess(order.index(("started", ok.id)), order.index(("finished", ok.id)))

    def test_task_finished_for_a_task_failed_by_recovery(self):
        finished = []

        def receiver(sender, task_result, **kwargs):
            finished.append((task_result.id, task_result.status, task_result.stream_status))

        task_finished.connect(receiver)
        self.addCleanup(task_finished.disconnect, receiver)
        dead_owner = f"{store.HOSTNAME}:{dead_pid()}:deadbeef"
        result = jobs.fail_on_a_crash.enqueue()
        EnqueuedTask.objects.filter(pk=result.id).update(
            status="running",
            attempts=1,
            lease_owner=dead_owner,
            lease_expires_at=timezone.now() + timedelta(minutes=5),
            worker_ids=[dead_owner],
        )

        async def scenario():
            async with serving():
                await wait_async(result)
                await eventually(lambda: finished, message="task_finished")

        async_to_sync(scenario)()
        self.assertEqual(finished, [(result.id, TaskResultStatus.FAILED, "failed")])
        self.assertEqual([e.exception_class_path for e in result.errors], [INTERRUPTED])


def dead_pid() -> int:
    """The pid of a process that has ended (this host's runner takes its tasks back at once)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def wait_async(result, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        await result.arefresh()
        if result.is_finished:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"task {result.id} did not finish: {result.stream_status}")
        await asyncio.sleep(0.02)


class ServerTests(ServerTestCase):
    """Tasks on a real runserver_stream process."""

    def stream(self, result, **kwargs):
        return read_stream(f"{self.server.url}{result.stream_url()}", **kwargs)

    @override_settings(ROOT_URLCONF="streaming.tests.taskviews")
    def test_enqueue_from_a_view_and_read_the_progress_stream_from_a_real_client(self):
        response = self.client.post("/count/", {"steps": "4"})
        self.assertEqual(response.status_code, 202)
        body = response.json()
        events = read_stream(f"{self.server.url}{body['stream_url']}", headers={"Last-Event-ID": "0"})
        self.assertEqual([e.event for e in events], ["progress"] * 4 + ["complete"])
        self.assertEqual([e.data["step"] for e in events[:4]], [1, 2, 3, 4])
        self.assertEqual(events[-1].data["counted"], 4)
        result = wait_result(default_task_backend.get_result(body["id"]), TaskResultStatus.SUCCESSFUL)
        self.assertEqual(result.return_value, {"counted": 4})

    def test_the_stream_needs_the_token(self):
        result = jobs.add.enqueue(1, 2)
        wait_result(result, TaskResultStatus.SUCCESSFUL)
        import httpx

        self.assertEqual(httpx.get(f"{self.server.url}{result.stream_path}").status_code, 403)
        self.assertEqual(self.stream(result)[-1].data["result"], 3)

    def test_sync_and_async_functions_run_with_their_progress(self):
        for job in (jobs.count_sync, jobs.count_async):
            with self.subTest(job.name):
                result = job.enqueue(3)
                events = self.stream(result, headers={"Last-Event-ID": "0"})
                self.assertEqual([e.event for e in events], ["progress"] * 3 + ["complete"])
                wait_result(result, TaskResultStatus.SUCCESSFUL)
                self.assertEqual(result.return_value, {"counted": 3})
                self.assertEqual(result.attempts, 1)
                self.assertEqual(len(result.worker_ids), 1)
                self.assertRegex(result.worker_ids[0], r"^.+:\d+:[0-9a-f]{8}$")  # host:pid:token
                self.assertIsNotNone(result.started_at)
                self.assertLessEqual(result.enqueued_at, result.started_at)
                self.assertLessEqual(result.started_at, result.finished_at)
                self.assertEqual(result.last_attempted_at, result.started_at)

    def test_get_result_from_another_process(self):
        result = jobs.add.enqueue(20, 22)
        wait_result(result, TaskResultStatus.SUCCESSFUL)
        code = (
            "import json; from streaming.tests import jobs; "
            f"r = jobs.add.get_result({result.id!r}); "
            "print(json.dumps([r.status, r.return_value, r.args, r.attempts]))"
        )
        out = manage("shell", "-c", code)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout.strip().splitlines()[-1]), ["SUCCESSFUL", 42, [20, 22], 1])

    def test_takes_context(self):
        result = jobs.report_context.enqueue("x")
        wait_result(result, TaskResultStatus.SUCCESSFUL)
        self.assertEqual(result.return_value, {"label": "x", "attempt": 1, "id": result.id})

    def test_an_exception_fails_the_task_with_its_class_and_traceback(self):
        result = jobs.fail.enqueue("boom")
        events = self.stream(result, headers={"Last-Event-ID": "0"})
        self.assertEqual(events[-1].event, "error")
        self.assertEqual((events[-1].data["type"], events[-1].data["message"]), ("ValueError", "boom"))
        wait_result(result, TaskResultStatus.FAILED)
        self.assertEqual(result.stream_status, "failed")
        self.assertEqual([e.exception_class_path for e in result.errors], ["builtins.ValueError"])
        self.assertIs(result.errors[0].exception_class, ValueError)
        self.assertIn("ValueError: boom", result.errors[0].traceback)
        with self.assertRaises(ValueError):
            result.return_value  # noqa: B018

    def test_a_task_that_cannot_be_imported_fails_with_its_reason(self):
        row = EnqueuedTask.objects.create(task_path="streaming.tests.jobs.moved_away")
        self.wait_status(row, "failed")
        self.assertEqual([e["exception_class_path"] for e in row.errors], ["builtins.ValueError"])
        self.assertIn("cannot be imported", row.errors[0]["traceback"])
        with self.assertRaisesMessage(ValueError, "cannot be imported"):
            default_task_backend.get_result(str(row.pk))

    def test_run_after_holds_the_task_until_then(self):
        after = timezone.now() + timedelta(seconds=1.5)
        result = jobs.stamp.using(run_after=after).enqueue("later")
        wait_result(result, TaskResultStatus.SUCCESSFUL)
        self.assertGreaterEqual(result.started_at, after)
        self.assertGreaterEqual(result.return_value["at"], after.timestamp())

    def test_cancel_a_running_task(self):
        marker = Path(tempfile.mkdtemp(prefix="taskbackend-")) / "stopped"
        self.addCleanup(shutil.rmtree, marker.parent, ignore_errors=True)
        cases = [
            ("async", jobs.wait_forever, {}),
            ("sync, is_cancelled()", jobs.wait_forever_sync, {"stopped_marker": str(marker)}),
            (
                "sync, send_event()",
                jobs.wait_forever_sync,
                {"stopped_marker": str(marker), "check_flag": False},
            ),
        ]
        for name, job, kwargs in cases:
            with self.subTest(name):
                marker.unlink(missing_ok=True)
                result = job.enqueue(**kwargs)
                events = []
                reader = threading.Thread(
                    target=self.stream,
                    args=(result,),
                    kwargs={"headers": {"Last-Event-ID": "0"}, "on_event": events.append},
                )
                reader.start()
                wait_for(lambda events=events: len(events) >= 2, message="ticks")
                self.assertIn(result.cancel(), ("running", "cancelled"))
                reader.join(15)
                self.assertEqual(events[-1].event, "cancelled")
                self.assertTrue(all(e.event == "tick" for e in events[:-1]))
                wait_result(result, TaskResultStatus.FAILED)
                self.assertEqual(result.stream_status, "cancelled")
                self.assertEqual([e.exception_class_path for e in result.errors], [CANCELLED])
                if kwargs:  # the sync function's thread ended too, not only its run
                    wait_for(marker.exists, message="the sync function to stop")

    def test_cancel_a_deferred_task_before_it_runs(self):
        result = jobs.add.using(run_after=timezone.now() + timedelta(hours=1)).enqueue(1, 1)
        default_task_backend.cancel(result.id)
        # A runner ends it at once, due or not, without running it.
        wait_result(result, TaskResultStatus.FAILED)
        self.assertEqual((result.stream_status, result.worker_ids), ("cancelled", []))
        self.assertEqual([e.exception_class_path for e in result.errors], [CANCELLED])


class OrderAndQueueTests(ServerTestCase):
    """One task at a time, serving the "reports" queue only."""

    server_settings = {"max_concurrent_tasks": 1, "task_queues": "reports"}

    def test_priorities_order_the_claims(self):
        reports = jobs.stamp.using(queue_name="reports")
        with transaction.atomic():  # all visible to the runner at once
            results = [reports.using(priority=p).enqueue(f"p{p}") for p in (0, -5, 10, 5, 10)]
        for result in results:
            wait_result(result, TaskResultStatus.SUCCESSFUL)
        ran = [r.return_value["label"] for r in sorted(results, key=lambda r: r.started_at)]
        self.assertEqual(ran, ["p10", "p10", "p5", "p0", "p-5"])
        first_p10 = sorted(results, key=lambda r: r.started_at)[0]
        self.assertEqual(first_p10.id, results[2].id)  # equal priorities: the older first

    def test_a_runner_serves_only_its_queues(self):
        elsewhere = jobs.stamp.enqueue("default queue")
        here = jobs.in_reports_queue.enqueue()
        wait_result(here, TaskResultStatus.SUCCESSFUL)
        self.assertEqual(here.return_value, "reports")
        elsewhere.refresh()  # older, so it would have run first on a runner serving its queue
        self.assertEqual(elsewhere.status, TaskResultStatus.READY)
        stray = jobs.stamp.enqueue("cancelled, in a queue served elsewhere")
        stray.cancel()  # ended here all the same, without running
        wait_result(stray, TaskResultStatus.FAILED)
        self.assertEqual((stray.stream_status, stray.worker_ids), ("cancelled", []))
        other = ServerProcess().start()  # every queue
        try:
            wait_result(elsewhere, TaskResultStatus.SUCCESSFUL)
        finally:
            other.stop()


class CrashTests(TransactionTestCase):
    def test_kill_9_mid_task_recovers_each_task_by_its_policy(self):
        server = ServerProcess().start()
        try:
            retried = jobs.survive_a_crash.enqueue(3)
            failed = jobs.fail_on_a_crash.enqueue()
            seen = []
            reader = threading.Thread(
                target=read_stream,
                args=(f"{server.url}{retried.stream_url()}",),
                kwargs={"headers": {"Last-Event-ID": "0"}, "on_event": seen.append},
                daemon=True,
            )
            reader.start()
            wait_for(lambda: len(seen) >= 2, message="ticks of the first attempt")
            wait_result(failed, TaskResultStatus.RUNNING)
            server.kill9()
            reader.join(10)
            last_seen = max(e.id for e in seen)
            server.start()  # the same port; the dead owner's tasks are taken back at once
            resumed = read_stream(
                f"{server.url}{retried.stream_url()}", headers={"Last-Event-ID": str(last_seen)}
            )
        finally:
            server.stop()
        self.assertEqual(resumed[0].event, "retry")
        self.assertEqual(resumed[-1].event, "complete")
        self.assertTrue(all(e.data["attempt"] == 2 for e in resumed[1:-1]))
        self.assertGreater(resumed[0].id, last_seen)
        wait_result(retried, TaskResultStatus.SUCCESSFUL)
        self.assertEqual(retried.return_value, {"attempt": 2})
        self.assertEqual(retried.attempts, 2)
        self.assertEqual(len(set(retried.worker_ids)), 2)
        self.assertEqual([e.exception_class_path for e in retried.errors], [INTERRUPTED])
        wait_result(failed, TaskResultStatus.FAILED)
        self.assertEqual(failed.stream_status, "failed")
        self.assertEqual([e.exception_class_path for e in failed.errors], [INTERRUPTED])
        self.assertIn("interrupted", failed.errors[0].traceback)


class BrowserTests(TransactionTestCase):
    """The README's example in a real Chromium: the page's button enqueues through the
    view, the page follows the task's progress over its signed stream URL."""

    def test_the_readme_example_shows_progress_in_a_browser(self):
        from django.conf import settings
        from django.contrib.auth.models import User

        from .test_browser import CHROMIUM, Browser, browser_missing, require, session_cookie_value

        require(browser_missing())
        user = User.objects.create_user("reporter", password="x")
        cookie = {"name": settings.SESSION_COOKIE_NAME, "value": session_cookie_value(user)}
        server = ServerProcess(env={"DJANGO_SETTINGS_MODULE": "streaming.tests.settings_tasks"}).start()
        browser = Browser(CHROMIUM)
        try:
            page = browser.open(f"{server.url}/reports/page/", cookies=[{**cookie, "url": server.url}])
            page.evaluate("() => startReport(7)")
            browser.run(
                lambda: page.page.wait_for_function(
                    "() => document.getElementById('state').textContent !== ''", polling=20, timeout=20_000
                ),
                timeout=30,
            )
            shown = page.evaluate(
                """() => ({bar: [document.getElementById('bar').value, document.getElementById('bar').max],
                          state: document.getElementById('state').innerHTML})"""
            )
        finally:
            browser.close()
            server.stop()
        self.assertEqual(shown["bar"], [3, 3], page.console)
        self.assertEqual(shown["state"], '<a href="/reports/7.pdf">Done</a>')
        row = EnqueuedTask.objects.get(task_path="streaming.tests.jobs.build_report")
        self.assertEqual((row.status, row.args), ("completed", [7]))


class WorkerTierTests(TransactionTestCase):
    """A web server that runs nothing, and a ``runtasks`` worker for one queue (needs Redis)."""

    def test_a_task_only_worker_runs_its_queue_and_the_web_server_streams_it(self):
        from streaming.conf import get_settings
        from streaming.transports import is_shared

        from .test_servers import NEEDS_SHARED, TaskWorker

        if not is_shared(get_settings().BROKER_URL):
            raise unittest.SkipTest(NEEDS_SHARED)
        web = ServerProcess(run_tasks=False).start()
        worker = TaskWorker(task_queues="reports").start()
        try:
            result = jobs.build_report.using(queue_name="reports").enqueue(3)
            events = read_stream(f"{web.url}{result.stream_url()}", headers={"Last-Event-ID": "0"})
            wait_result(result, TaskResultStatus.SUCCESSFUL)
        finally:
            worker.stop()
            web.stop()
        self.assertEqual([e.event for e in events], ["progress"] * 3 + ["complete"])
        self.assertIn(f":{worker.proc.pid}:", result.worker_ids[0])
