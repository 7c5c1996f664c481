"""The admin: the read-only event log, StreamTaskAdmin's actions, filters and change
page, ``rerun()``; and, in Chromium, the change page's live tail of the event log."""

import json
import unittest

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.contrib.staticfiles import finders
from django.db import connection
from django.test import TestCase, TransactionTestCase

from demo.models import ContinueTask, ExampleTask
from streaming.events import Event
from streaming.keys import TaskKey
from streaming.models import Status, TaskEvent
from streaming.tasks.store import write_events
from streaming.tests.testapp.models import PrivateTask, ScriptedTask

from .support import ServerProcess, wait_for
from .test_browser import CHROMIUM, NOT_ON_SQLITE, Browser, browser_missing, require, session_cookie_value

CHANGELIST = "/admin/demo/exampletask/"


def log(task, *types, payload='{{"n": {seq}}}'):
    write_events(
        [(TaskKey.of(task), Event(seq, t, payload.format(seq=seq))) for seq, t in enumerate(types, 1)]
    )


class AdminCase(TestCase):
    def setUp(self):
        self.admin = User.objects.create_superuser("admin", "a@example.com", "pw")
        self.client.force_login(self.admin)

    def act(self, action, *tasks, url=CHANGELIST):
        response = self.client.post(
            url, {"action": action, "_selected_action": [t.pk for t in tasks]}, follow=True
        )
        self.assertEqual(response.status_code, 200)
        return [str(m) for m in get_messages(response.wsgi_request)]


class EventLogAdminTests(AdminCase):
    """The event log is written by the runner alone: the admin shows it, and that is all."""

    def setUp(self):
        super().setUp()
        task = ExampleTask.objects.create(status="completed")
        log(task, "start", "complete")
        self.event = TaskEvent.objects.get(seq=1)

    def test_a_superuser_may_view_but_not_add_change_or_delete_events(self):
        base = "/admin/streaming/taskevent/"
        response = self.client.get(base)
        self.assertEqual(response.status_code, 200)
        self.assertNotContains(response, f"{base}add/")
        self.assertNotContains(response, "delete_selected")
        self.assertEqual(self.client.get(f"{base}add/").status_code, 403)
        page = self.client.get(f"{base}{self.event.pk}/change/")
        self.assertEqual(page.status_code, 200)
        self.assertContains(page, "View task event")
        self.assertNotContains(page, 'name="_save"')
        self.assertContains(page, "{&quot;n&quot;: 1}")
        edit = self.client.post(f"{base}{self.event.pk}/change/", {"type": "forged", "payload": "{}"})
        self.assertEqual(edit.status_code, 403)
        self.assertEqual(self.client.get(f"{base}{self.event.pk}/delete/").status_code, 403)
        self.assertEqual(self.client.post(f"{base}{self.event.pk}/delete/", {"post": "yes"}).status_code, 403)
        self.event.refresh_from_db()
        self.assertEqual((self.event.type, self.event.payload), ("start", '{"n": 1}'))
        self.assertEqual(TaskEvent.objects.count(), 2)


class ActionTests(AdminCase):
    def test_start_queues_created_tasks_and_says_which_were_not(self):
        created = [ExampleTask.objects.create(status="created") for _ in range(2)]
        running = ExampleTask.objects.create(status="running")
        messages = self.act("start_selected", *created, running)
        self.assertEqual(
            messages, ["2 tasks queued; 1 was not 'created' (only tasks created with status 'created' start)"]
        )
        for task in created:
            task.refresh_from_db()
            self.assertEqual(task.status, Status.PENDING)
        running.refresh_from_db()
        self.assertEqual(running.status, Status.RUNNING)
        self.assertEqual(
            self.act("start_selected", created[0]),
            ["0 tasks queued; 1 was not 'created' (only tasks created with status 'created' start)"],
        )

    def test_rerun_queues_finished_tasks_again_as_new_rows(self):
        finished = [
            ExampleTask.objects.create(
                status=status, message=f"was {status}", total_steps=5, final_value={"x": 1}
            )
            for status in ("completed", "failed", "cancelled")
        ]
        running = ExampleTask.objects.create(status="running")
        before = set(ExampleTask.objects.values_list("pk", flat=True))
        [message] = self.act("rerun_selected", *finished, running)
        new = ExampleTask.objects.exclude(pk__in=before).order_by("pk")
        self.assertEqual(len(new), 3)
        self.assertEqual(
            sorted((t.status, t.message, t.total_steps, t.final_value) for t in new),
            sorted(("pending", f"was {s}", 5, None) for s in ("completed", "failed", "cancelled")),
        )
        self.assertTrue(message.startswith("3 tasks queued again as new tasks: "), message)
        for task in new:
            self.assertIn(
                f'<a href="/admin/demo/exampletask/{task.pk}/change/">ExampleTask {task.pk} (pending)</a>',
                message,
            )
        self.assertTrue(
            message.endswith("; 1 was not finished (only completed, failed or cancelled tasks run again)"),
            message,
        )
        # The old rows keep their finished history.
        self.assertEqual(
            [ExampleTask.objects.get(pk=t.pk).status for t in (*finished, running)],
            ["completed", "failed", "cancelled", "running"],
        )

    def test_cancel_requests_cancellation_and_says_which_were_finished(self):
        running = ExampleTask.objects.create(status="running")
        created = ExampleTask.objects.create(status="created")
        done = ExampleTask.objects.create(status="completed")
        messages = self.act("cancel_selected", running, created, done)
        self.assertEqual(messages, ["Cancellation requested for 2 tasks; 1 was already finished"])
        running.refresh_from_db()
        created.refresh_from_db()
        done.refresh_from_db()
        self.assertTrue(running.cancel_requested)
        self.assertEqual((created.status, created.cancel_requested), ("pending", True))
        self.assertEqual((done.status, done.cancel_requested), ("completed", False))

    def test_a_user_who_may_only_view_gets_no_actions(self):
        viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
        viewer.user_permissions.add(Permission.objects.get(codename="view_exampletask"))
        self.client.force_login(viewer)
        task = ExampleTask.objects.create(status="created")
        page = self.client.get(CHANGELIST)
        self.assertEqual(page.status_code, 200)
        for action in ("start_selected", "rerun_selected", "cancel_selected"):
            self.assertNotContains(page, action)
        self.act("start_selected", task)
        self.act("cancel_selected", task)
        task.refresh_from_db()
        self.assertEqual((task.status, task.cancel_requested), ("created", False))


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

    def test_changes_set_fields_of_the_new_row(self):
        task = ScriptedTask.objects.create(steps=7, delay=0.5, status="completed")
        new = ScriptedTask.objects.get(pk=task.rerun(steps=3).pk)
        self.assertEqual((new.steps, new.delay, new.status), (3, 0.5, "pending"))

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


class ChangelistAndPageTests(AdminCase):
    def test_filters_by_status_and_time(self):
        ExampleTask.objects.create(status="completed", message="done one")
        ExampleTask.objects.create(status="running", message="busy one")
        page = self.client.get(CHANGELIST)
        self.assertContains(page, "By status")
        self.assertContains(page, "By created at")
        self.assertContains(page, 'class="toplinks"')  # the date hierarchy (Django 6 adds aria-labelledby)
        self.assertContains(page, "?status__exact=completed")
        filtered = self.client.get(CHANGELIST, {"status__exact": "completed"})
        self.assertContains(filtered, "(completed)")
        self.assertNotContains(filtered, "(running)")
        in_range = self.client.get(
            CHANGELIST,
            {"created_at__gte": "2000-01-01 00:00:00+00:00", "created_at__lt": "2999-01-01 00:00:00+00:00"},
        )
        self.assertContains(in_range, "(running)")
        self.assertContains(in_range, "(completed)")
        other_year = self.client.get(CHANGELIST, {"created_at__year": "2001"})  # the date hierarchy's
        self.assertNotContains(other_year, "(running)")
        self.assertContains(other_year, "0 example tasks")

    def test_the_change_page_links_the_stream_and_loads_the_live_tail(self):
        task = ExampleTask.objects.create(status="running")
        log(task, "start", "progress")
        page = self.client.get(f"{CHANGELIST}{task.pk}/change/")
        self.assertContains(page, f'<a href="/stream/ExampleTask/{task.pk}?history=all">')
        self.assertContains(page, f"$SERVER</span>/stream/ExampleTask/{task.pk}</code>")
        self.assertNotContains(page, "Bearer")  # a public class needs no token
        self.assertContains(page, f'data-stream="/stream/ExampleTask/{task.pk}" data-last-seq="2"')
        self.assertContains(page, "streaming/admin-tail.js")
        self.assertIsNotNone(finders.find("streaming/admin-tail.js"))

    def test_a_protected_task_says_how_to_get_its_status(self):
        task = PrivateTask.objects.create(status="created")
        page = self.client.get(f"/admin/testapp/privatetask/{task.pk}/change/")
        self.assertContains(page, "-H &quot;Authorization: Bearer $TOKEN&quot;")
        self.assertContains(page, "task.stream_token()")
        self.assertContains(page, 'data-last-seq=""')
        self.assertContains(page, "No events yet")

    def test_event_data_is_escaped(self):
        task = ExampleTask.objects.create(status="completed")
        log(task, "complete", payload='{{"html": "<img src=x onerror=alert({seq})>"}}')
        page = self.client.get(f"{CHANGELIST}{task.pk}/change/")
        self.assertNotContains(page, "<img src=x")
        self.assertContains(page, "&lt;img src=x onerror=alert(1)&gt;")

    def test_a_long_log_shows_its_last_events(self):
        task = ExampleTask.objects.create(status="completed")
        log(task, *["progress"] * 501, "complete")
        page = self.client.get(f"{CHANGELIST}{task.pk}/change/")
        self.assertContains(page, "The last 500 events of 502.")
        self.assertContains(page, 'data-last-seq="502"')
        self.assertContains(page, "<tr><td>3</td>")
        self.assertNotContains(page, "<tr><td>2</td>")


class LiveTailBrowserTests(TransactionTestCase):
    """A superuser's session in Chromium: the change page of a running task shows its
    events as they come, without reload (static files served: DEBUG on)."""

    @classmethod
    def setUpClass(cls):
        if connection.vendor != "sqlite":
            raise unittest.SkipTest(NOT_ON_SQLITE)
        require(browser_missing())
        super().setUpClass()
        # DEBUG: runserver_stream serves static files (the tail's JS) only then.
        cls.server = ServerProcess(env={"DJANGO_DEBUG": "1"})
        cls.addClassCleanup(cls.server.stop)
        cls.server.start()
        cls.browser = Browser(CHROMIUM)
        cls.addClassCleanup(cls.browser.close)

    def test_new_events_appear_live_through_the_terminal_event(self):
        admin = User.objects.create_superuser("admin", "a@example.com", "pw")
        hostile = '<b>bold</b><img src=x onerror="window.pwned = 1">'
        task = PrivateTask.objects.create(status="created", steps=3, delay=0.3, result={"note": hostile})
        cookie = {
            "name": settings.SESSION_COOKIE_NAME,
            "value": session_cookie_value(admin),
            "url": self.server.url,
        }
        page = self.browser.open(f"{self.server.url}/admin/testapp/privatetask/{task.pk}/change/", [cookie])
        self.addCleanup(page.close)
        table = "document.querySelector('table.streaming-events')"
        wait = lambda script: page.browser.run(  # noqa: E731
            lambda: page.page.wait_for_function(script, polling=20, timeout=15_000), timeout=25
        )
        try:
            wait(f"() => ({table}.dataset.tail || '').startsWith('Live')")
        except Exception:
            self.fail(
                f"the tail did not connect: {page.evaluate(f'() => {table}.dataset.tail')}; {page.console}"
            )
        # Record when each row arrives, and mark this document: a reload would lose the mark.
        page.evaluate(
            f"""() => {{
              window.sameDocument = true;
              window.arrived = [];
              new MutationObserver(() => {{
                for (const row of {table}.querySelectorAll('tr.streaming-live:not([data-seen])')) {{
                  row.dataset.seen = '1';
                  window.arrived.push([Number(row.cells[0].textContent), performance.now()]);
                }}
              }}).observe({table}, {{childList: true, subtree: true}});
            }}"""
        )
        self.assertTrue(task.start())
        wait(f"() => ({table}.dataset.tail || '').startsWith('Finished')")
        rows = page.evaluate(
            f"""() => [...{table}.tBodies[0].rows].map((row) => ({{
              cells: [...row.cells].map((cell) => cell.textContent),
              elements: row.cells[2] ? row.cells[2].querySelectorAll('b, img').length : -1,
            }}))"""
        )
        self.assertEqual(
            [r["cells"][:2] for r in rows], [["1", "step"], ["2", "step"], ["3", "step"], ["4", "complete"]]
        )
        self.assertEqual([json.loads(r["cells"][2])["step"] for r in rows[:3]], [1, 2, 3])
        self.assertEqual(json.loads(rows[3]["cells"][2])["note"], hostile)  # shown as text
        self.assertEqual({r["elements"] for r in rows}, {0})
        state = page.evaluate(
            "() => ({same: window.sameDocument, pwned: window.pwned, arrived: window.arrived})"
        )
        self.assertTrue(state["same"])
        self.assertIsNone(state.get("pwned"))
        arrived = state["arrived"]
        self.assertEqual([seq for seq, _ in arrived], [1, 2, 3, 4])
        # One by one as the task sent them (0.3 s apart), not all at the end.
        self.assertGreater(arrived[-1][1] - arrived[0][1], 400, arrived)
        wait_for(lambda: PrivateTask.objects.get(pk=task.pk).status == "completed", message="the task's row")
