"""The dashboard (streaming.urls, mounted at /streaming/ in the demo project).

Views with Django's test client: who may see it (anonymous, non-staff,
staff, per-model permissions, the DASHBOARD_ACCESS hook), the JSON list
(filters, order, pages, bad input), the task page, and the actions'
permission checks and answers. DashboardBrowserTests (end of file) drive
the pages in Chromium against a real server.
"""

import json
import unittest
from io import StringIO
from unittest import mock

from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.contrib.staticfiles import finders
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from django.test import Client, TestCase, TransactionTestCase, override_settings

from demo.models import ContinueTask, ExampleTask
from streaming.dashboard import rows as dashboard_rows
from streaming.models import Status
from streaming.tests.otherapp.models import Report as OtherReport
from streaming.tests.testapp.models import Report, ScriptedTask

from .support import ServerProcess
from .test_admin import log
from .test_browser import CHROMIUM, NOT_ON_SQLITE, Browser, browser_missing, require, session_cookie_value

LIST = "/streaming/"
ROWS = "/streaming/tasks.json"


def page(task) -> str:
    return f"/streaming/{task._meta.app_label}/{type(task).__name__}/{task.pk}/"


def everyone(user) -> bool:
    """A DASHBOARD_ACCESS hook for the tests: every signed-in user."""
    return True


def grant(user, *codenames):
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return User.objects.get(pk=user.pk)  # permissions are cached per instance


class DashboardCase(TestCase):
    def setUp(self):
        self.admin = User.objects.create_superuser("admin", "a@example.com", "pw")
        self.client.force_login(self.admin)

    def rows(self, client=None, **query) -> dict:
        response = (client or self.client).get(ROWS, query)
        self.assertEqual(response.status_code, 200, response.content)
        return response.json()

    def message(self, response) -> str:
        """The message the action added (a redirect not followed leaves earlier ones queued: the last)."""
        return [str(m) for m in get_messages(response.wsgi_request)][-1]


class AccessTests(DashboardCase):
    def test_anonymous_users_are_sent_to_log_in(self):
        task = ExampleTask.objects.create()
        anonymous = Client()
        for url in (LIST, page(task)):
            with self.subTest(url=url):
                response = anonymous.get(url)
                self.assertEqual(response.status_code, 302)
                self.assertEqual(response["Location"], f"{settings.LOGIN_URL}?next={url}")
        response = anonymous.get(ROWS)
        self.assertEqual((response.status_code, response.json()), (401, {"error": "Log in to see tasks"}))

    def test_users_who_are_not_staff_get_403(self):
        user = grant(User.objects.create_user("user", password="pw"), "view_exampletask")
        client = Client()
        client.force_login(user)
        task = ExampleTask.objects.create()
        for url in (LIST, page(task), ROWS):
            with self.subTest(url=url):
                self.assertEqual(client.get(url).status_code, 403)
        self.assertEqual(client.post(f"{page(task)}cancel").status_code, 403)
        self.assertFalse(ExampleTask.objects.get(pk=task.pk).cancel_requested)

    def test_staff_see_only_the_models_they_may_view(self):
        staff = grant(User.objects.create_user("staff", password="pw", is_staff=True), "view_exampletask")
        client = Client()
        client.force_login(staff)
        example = ExampleTask.objects.create()
        waiting = ContinueTask.objects.create()
        listing = client.get(LIST)
        self.assertEqual(listing.status_code, 200)
        self.assertContains(listing, 'value="demo.ExampleTask"')
        self.assertNotContains(listing, 'value="demo.ContinueTask"')
        self.assertEqual(
            listing.context["config"]["feeds"], ["demo/ExampleTask"]
        )  # the one live connection's feeds
        self.assertEqual([r["key"] for r in self.rows(client)["tasks"]], [f"demo/ExampleTask/{example.pk}"])
        self.assertEqual(client.get(page(example)).status_code, 200)
        self.assertEqual(client.get(page(waiting)).status_code, 403)
        bad = client.get(ROWS, {"model": "demo.ContinueTask"})
        self.assertEqual(bad.status_code, 400)
        self.assertIn("use one of the models you may see (demo.ExampleTask)", bad.json()["error"])

    def test_staff_without_any_view_permission_get_an_empty_dashboard(self):
        staff = User.objects.create_user("staff", password="pw", is_staff=True)
        client = Client()
        client.force_login(staff)
        ExampleTask.objects.create()
        self.assertContains(client.get(LIST), "You may not see any task model")
        self.assertEqual(self.rows(client)["tasks"], [])

    def test_a_model_with_rules_per_row_is_listed_but_not_followed_live_except_by_superusers(self):
        staff = grant(User.objects.create_user("staff", password="pw", is_staff=True), "view_ownedtask")
        client = Client()
        client.force_login(staff)
        self.assertEqual(client.get(LIST).context["config"]["feeds"], [])  # has_feed_permission: no
        self.assertIn("testapp/OwnedTask", self.client.get(LIST).context["config"]["feeds"])

    def test_the_gate_is_a_setting(self):
        user = grant(User.objects.create_user("user", password="pw"), "view_exampletask")
        client = Client()
        client.force_login(user)
        with override_settings(STREAMING={"DASHBOARD_ACCESS": "streaming.tests.test_dashboard.everyone"}):
            self.assertEqual(client.get(LIST).status_code, 200)
        self.assertEqual(client.get(LIST).status_code, 403)
        with (
            override_settings(STREAMING={"DASHBOARD_ACCESS": "streaming.tests.nowhere.gate"}),
            self.assertRaisesMessage(
                ImproperlyConfigured, "'streaming.tests.nowhere.gate' cannot be imported"
            ),
        ):
            client.get(LIST)


class ListTests(DashboardCase):
    def test_rows_newest_first_across_models_with_their_latest_event(self):
        first = ExampleTask.objects.create(status="completed")
        second = ContinueTask.objects.create(status="running")
        third = ScriptedTask.objects.create(status="pending")
        log(second, "started", "final", payload='{{"message": "step {seq}"}}')
        tasks = self.rows()["tasks"]
        keys = [r["key"] for r in tasks]
        self.assertEqual(
            keys[:3],
            [
                f"testapp/ScriptedTask/{third.pk}",
                f"demo/ContinueTask/{second.pk}",
                f"demo/ExampleTask/{first.pk}",
            ],
        )
        row = tasks[1]
        self.assertEqual(row["latest"], {"id": 2, "type": "final", "data": {"message": "step 2"}})
        self.assertEqual(row["model"], "demo.ContinueTask")
        self.assertEqual(row["status"], "running")
        self.assertEqual(row["url"], page(second))
        self.assertIsNone(tasks[0]["latest"])

    def test_filters_by_model_and_status(self):
        done = ExampleTask.objects.create(status="completed")
        ExampleTask.objects.create(status="running")
        ContinueTask.objects.create(status="completed")
        rows = self.rows(model="demo.ExampleTask", status="completed")["tasks"]
        self.assertEqual([r["key"] for r in rows], [f"demo/ExampleTask/{done.pk}"])
        listing = self.client.get(LIST, {"model": "demo.ExampleTask", "status": "completed"})
        self.assertContains(listing, '<option value="demo.ExampleTask" selected>')
        self.assertContains(listing, '<option value="completed" selected>')
        self.assertEqual(listing.context["config"]["feeds"], ["demo/ExampleTask"])

    def test_two_apps_models_of_one_class_name_have_rows_and_names_of_their_own(self):
        # testapp.Report and otherapp.Report, one pk: their events both say "Report/7001".
        Report.objects.create(pk=7001, status="completed")
        OtherReport.objects.create(pk=7001, status="running")
        rows = {r["key"]: r for r in self.rows()["tasks"]}
        self.assertEqual(rows["testapp/Report/7001"]["status"], "completed")
        self.assertEqual(rows["otherapp/Report/7001"]["status"], "running")
        self.assertEqual(rows["otherapp/Report/7001"]["url"], "/streaming/otherapp/Report/7001/")
        listing = self.client.get(LIST)
        models = listing.context["config"]["models"]
        self.assertEqual(models["testapp/Report"], "testapp.Report")
        self.assertEqual(models["otherapp/Report"], "otherapp.Report")
        self.assertEqual(models["demo/ExampleTask"], "demo.ExampleTask")
        self.assertContains(listing, '<option value="otherapp.Report">Report (otherapp)</option>')
        self.assertContains(listing, '<option value="demo.ExampleTask">Example task</option>')

    def test_pages(self):
        ExampleTask.objects.bulk_create([ExampleTask(status="completed", message=str(n)) for n in range(51)])
        first, second = self.rows(), self.rows(page=2)
        self.assertEqual((len(first["tasks"]), first["has_next"]), (50, True))
        self.assertEqual((len(second["tasks"]), second["has_next"]), (1, False))
        self.assertFalse({r["key"] for r in first["tasks"]} & {r["key"] for r in second["tasks"]})

    def test_the_last_page_has_no_next(self):
        ExampleTask.objects.bulk_create([ExampleTask(status="completed", message=str(n)) for n in range(101)])
        with mock.patch.object(dashboard_rows, "MAX_PAGE", 2):
            last = self.rows(page=2)
            self.assertEqual((len(last["tasks"]), last["has_next"]), (50, False))  # 1 older: past the cap
            self.assertEqual(self.client.get(ROWS, {"page": 3}).status_code, 400)

    def test_one_row_by_id_with_its_outcome(self):
        task = ExampleTask.objects.create(status="completed", final_value={"answer": 42})
        ExampleTask.objects.create(status="completed")
        [row] = self.rows(model="demo.ExampleTask", id=task.pk)["tasks"]
        self.assertEqual((row["id"], row["final_value"], row["error"]), (task.pk, {"answer": 42}, None))
        failed = ExampleTask.objects.create(status="failed", error="Traceback ...\nValueError: no")
        log(failed, "error", payload='{{"message": "no", "type": "ValueError"}}')
        [row] = self.rows(model="demo.ExampleTask", id=failed.pk)["tasks"]
        self.assertEqual(row["error"], {"type": "ValueError", "message": "no"})
        self.assertEqual(self.rows(model="demo.ExampleTask", id=task.pk, status="failed")["tasks"], [])

    def test_several_rows_by_id(self):
        tasks = [ExampleTask.objects.create(status="completed") for _ in range(3)]
        query = [("model", "demo.ExampleTask"), *[("id", t.pk) for t in tasks[:2]]]
        response = self.client.get(f"{ROWS}?{'&'.join(f'{k}={v}' for k, v in query)}")
        self.assertEqual({r["id"] for r in response.json()["tasks"]}, {tasks[0].pk, tasks[1].pk})
        self.assertNotIn("final_value", response.json()["tasks"][0])  # the outcome: for one task only
        too_many = "&".join(f"id={n}" for n in range(1, 52))
        response = self.client.get(f"{ROWS}?model=demo.ExampleTask&{too_many}")
        self.assertEqual(response.status_code, 400)
        self.assertIn("Too many ids (51): at most 50 a request", response.json()["error"])

    def test_bad_input_gets_400_with_a_message(self):
        cases = {
            (("status", "done"),): "Unknown status 'done': use one of created, pending",
            (("model", "demo.Nope"),): "Unknown model 'demo.Nope'",
            (("page", "0"),): "Bad page '0'",
            (("page", "x"),): "Bad page 'x'",
            (("page", "\u00b2"),): "Bad page '\u00b2'",  # a digit to isdigit(), not to int()
            # Past the last page (it reads page * 50 + 1 rows per model): a 400, not the work.
            (("page", "101"),): "Bad page '101': a number from 1 to 100 (the newest 5,000 tasks)",
            (("page", "1000"),): "Bad page '1000': a number from 1 to 100",
            (("id", "3"),): "id needs model",
            (("model", "demo.ExampleTask"), ("id", "x")): "Bad id 'x' for demo.ExampleTask",
        }
        for query, message in cases.items():
            with self.subTest(query=query):
                response = self.client.get(ROWS, dict(query))
                self.assertEqual(response.status_code, 400)
                self.assertIn(message, response.json()["error"])
        listing = self.client.get(LIST, {"status": "done"})
        self.assertEqual(listing.status_code, 400)
        self.assertIn(b"Unknown status 'done'", listing.content)
        self.assertEqual(self.client.post(ROWS).status_code, 405)

    def test_the_page_loads_its_script_and_styles(self):
        listing = self.client.get(LIST)
        self.assertContains(listing, 'src="/static/streaming/dashboard.js"')
        self.assertContains(listing, 'type="module"')
        self.assertContains(listing, 'href="/static/streaming/dashboard.css"')
        self.assertContains(listing, '<meta name="viewport"')
        for name in ("dashboard.js", "dashboard.css", "streaming.js"):
            self.assertIsNotNone(finders.find(f"streaming/{name}"), name)


class TaskPageTests(DashboardCase):
    def test_fields_status_and_final_value(self):
        task = ExampleTask.objects.create(status="completed", message="<b>hi</b>", final_value={"n": "<i>"})
        response = self.client.get(page(task))
        self.assertContains(response, f"ExampleTask {task.pk}")
        self.assertContains(response, "&lt;b&gt;hi&lt;/b&gt;")  # the task's own field, escaped
        self.assertContains(response, "Total steps")
        self.assertContains(response, "&quot;n&quot;: &quot;&lt;i&gt;&quot;")
        self.assertContains(response, 'class="status status-completed"')
        config = response.context["config"]
        self.assertEqual(config["stream"], f"/stream/ExampleTask/{task.pk}")
        self.assertEqual(config["row"], f"/streaming/tasks.json?model=demo.ExampleTask&id={task.pk}")

    def test_a_class_name_two_apps_share_is_streamed_by_its_app_label(self):
        theirs = OtherReport.objects.create(status="running")
        response = self.client.get(page(theirs))
        self.assertEqual(response.context["config"]["stream"], f"/stream/otherapp/Report/{theirs.pk}")
        self.assertEqual(Report(pk=3).get_stream_path(), "/stream/testapp/Report/3")
        self.assertTrue(theirs.stream_url().startswith(f"/stream/otherapp/Report/{theirs.pk}?token="))
        # A unique class name: as before.
        self.assertEqual(ExampleTask(pk=3).get_stream_path(), "/stream/ExampleTask/3")

    def test_a_failed_task_shows_its_error(self):
        task = ExampleTask.objects.create(
            status="failed", error="Traceback (most recent call last)\nKeyError"
        )
        log(task, "error", payload='{{"message": "missing key", "type": "KeyError"}}')
        response = self.client.get(page(task))
        self.assertContains(response, "<strong>KeyError</strong>: missing key")
        self.assertContains(response, "<summary>Traceback</summary>")

    def test_actions_shown_by_permission_and_status(self):
        running = ExampleTask.objects.create(status="running")
        response = self.client.get(page(running))
        self.assertContains(response, "csrfmiddlewaretoken")
        self.assertContains(response, f'action="{page(running)}cancel" data-when="created pending running">')
        self.assertContains(
            response, f'action="{page(running)}rerun" data-when="completed failed cancelled" hidden>'
        )
        viewer = grant(User.objects.create_user("viewer", password="pw", is_staff=True), "view_exampletask")
        client = Client()
        client.force_login(viewer)
        response = client.get(page(running))
        self.assertEqual(response.status_code, 200)
        self.assertNotContains(response, "<form")

    def test_unknown_models_and_tasks_are_404(self):
        for url in ("/streaming/demo/Nope/1/", "/streaming/auth/User/1/", "/streaming/demo/ExampleTask/999/"):
            with self.subTest(url=url):
                self.assertEqual(self.client.get(url).status_code, 404)
        self.assertEqual(self.client.get("/streaming/demo/ExampleTask/x/").status_code, 404)


class ActionTests(DashboardCase):
    def test_cancel(self):
        task = ExampleTask.objects.create(status="running")
        response = self.client.post(f"{page(task)}cancel")
        self.assertRedirects(response, page(task), fetch_redirect_response=False)
        self.assertEqual(self.message(response), f"Cancellation requested for ExampleTask {task.pk}")
        self.assertTrue(ExampleTask.objects.get(pk=task.pk).cancel_requested)
        done = ExampleTask.objects.create(status="completed")
        response = self.client.post(f"{page(done)}cancel")
        self.assertEqual(
            self.message(response),
            f"ExampleTask {done.pk} had already finished (completed): nothing to cancel",
        )

    def test_start(self):
        task = ExampleTask.objects.create(status="created")
        response = self.client.post(f"{page(task)}start")
        self.assertRedirects(response, page(task), fetch_redirect_response=False)
        self.assertEqual(self.message(response), f"ExampleTask {task.pk} queued")
        self.assertEqual(ExampleTask.objects.get(pk=task.pk).status, Status.PENDING)
        response = self.client.post(f"{page(task)}start")
        self.assertIn("is pending: only a task created with status 'created'", self.message(response))

    def test_rerun(self):
        task = ExampleTask.objects.create(status="failed", message="again")
        response = self.client.post(f"{page(task)}rerun")
        new = ExampleTask.objects.latest("pk")
        self.assertNotEqual(new.pk, task.pk)
        self.assertEqual((new.status, new.message), ("pending", "again"))
        self.assertRedirects(response, page(new), fetch_redirect_response=False)
        self.assertEqual(self.message(response), f"ExampleTask {task.pk} runs again as ExampleTask {new.pk}")
        running = ExampleTask.objects.create(status="running")
        response = self.client.post(f"{page(running)}rerun")
        self.assertRedirects(response, page(running), fetch_redirect_response=False)
        self.assertIn("only a finished task", self.message(response))
        self.assertEqual(ExampleTask.objects.count(), 3)

    def test_permissions_as_the_admins_actions(self):
        staff = grant(User.objects.create_user("staff", password="pw", is_staff=True), "view_exampletask")
        client = Client()
        client.force_login(staff)
        running = ExampleTask.objects.create(status="running")
        done = ExampleTask.objects.create(status="completed")
        self.assertEqual(client.post(f"{page(running)}cancel").status_code, 403)
        self.assertEqual(client.post(f"{page(done)}rerun").status_code, 403)
        self.assertFalse(ExampleTask.objects.get(pk=running.pk).cancel_requested)
        staff = grant(staff, "change_exampletask")
        client.force_login(staff)
        self.assertEqual(client.post(f"{page(running)}cancel").status_code, 302)  # change: cancel, start
        self.assertEqual(client.post(f"{page(done)}rerun").status_code, 403)  # re-run needs add
        staff = grant(staff, "add_exampletask")
        client.force_login(staff)
        self.assertEqual(client.post(f"{page(done)}rerun").status_code, 302)
        other = ContinueTask.objects.create(status="running")  # no permission on this model at all
        self.assertEqual(client.post(f"{page(other)}cancel").status_code, 403)

    def test_bad_requests(self):
        task = ExampleTask.objects.create(status="running")
        self.assertEqual(self.client.get(f"{page(task)}cancel").status_code, 405)
        self.assertEqual(self.client.post("/streaming/demo/ExampleTask/999/cancel").status_code, 404)
        self.assertEqual(self.client.post("/streaming/demo/Nope/1/cancel").status_code, 404)
        self.assertEqual(self.client.post("/streaming/demo/ExampleTask/x/start").status_code, 404)
        anonymous = Client()
        response = anonymous.post(f"{page(task)}cancel")
        self.assertEqual(response.status_code, 302)
        self.assertTrue(response["Location"].startswith(settings.LOGIN_URL))
        csrf = Client(enforce_csrf_checks=True)
        csrf.force_login(self.admin)
        self.assertEqual(csrf.post(f"{page(task)}cancel").status_code, 403)
        self.assertFalse(ExampleTask.objects.get(pk=task.pk).cancel_requested)


# Put into every dashboard page before its scripts: records the URL of each
# request to /stream/ (the page's live connections) and to tasks.json.
RECORD_STREAMS = """
window.streamRequests = [];
window.rowRequests = [];
const originalFetch = window.fetch;
window.fetch = (input, init) => {
  const url = String(input instanceof Request ? input.url : input);
  if (url.includes("/stream/")) window.streamRequests.push(url);
  if (url.includes("/tasks.json")) window.rowRequests.push(url);
  return originalFetch(input, init);
};
"""


class DashboardBrowserTests(TransactionTestCase):
    """The pages in Chromium, signed in as a superuser, against a real server (DEBUG:
    static files served). Each asserts what the page shows, without reloading."""

    @classmethod
    def setUpClass(cls):
        if connection.vendor != "sqlite":
            raise unittest.SkipTest(NOT_ON_SQLITE)
        require(browser_missing())
        super().setUpClass()
        cls.server = ServerProcess(env={"DJANGO_DEBUG": "1"})
        cls.addClassCleanup(cls.server.stop)
        cls.server.start()
        cls.browser = Browser(CHROMIUM)
        cls.addClassCleanup(cls.browser.close)

    def setUp(self):
        self.admin = User.objects.create_superuser("admin", "a@example.com", "pw")

    def open(self, path: str, server: ServerProcess | None = None, width: int = 1280):
        from .test_browser import Page

        server = server or self.server
        cookie = {
            "name": settings.SESSION_COOKIE_NAME,
            "value": session_cookie_value(self.admin),
            "url": server.url,
        }

        def open_page():
            context = self.browser._browser.new_context(viewport={"width": width, "height": 900})
            context.add_cookies([cookie])
            context.add_init_script(RECORD_STREAMS)
            tab = context.new_page()
            console: list[str] = []
            tab.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            tab.goto(f"{server.url}{path}")
            return context, tab, console

        opened = Page(self.browser, *self.browser.run(open_page))
        self.addCleanup(opened.close)
        return opened

    def wait(self, page, condition: str, arg=None, timeout: float = 20.0):
        try:
            return page.browser.run(
                lambda: page.page.wait_for_function(condition, arg=arg, polling=50, timeout=timeout * 1000),
                timeout=timeout + 10,
            )
        except Exception:
            state = page.evaluate(
                "() => [...document.querySelectorAll('#tasks tbody tr')].map((tr) => tr.dataset.key + ' ' + "
                "tr.dataset.status).join(', ') || document.querySelector('main').innerText"
            )
            self.fail(f"the page never showed {condition} ({arg}): {state}; console: {page.console}")

    def wait_live(self, page):
        self.wait(page, "() => document.querySelector('[data-live]').dataset.live === 'open'")

    def row(self, page, key: str) -> dict | None:
        return page.evaluate(
            """(key) => {
              const tr = document.querySelector(`tr[data-key="${key}"]`);
              return tr && {status: tr.dataset.status, text: tr.innerText, index: tr.sectionRowIndex};
            }""",
            key,
        )

    def click(self, page, selector: str):
        page.browser.run(lambda: page.page.click(selector))
        page.browser.run(lambda: page.page.wait_for_load_state())

    def events(self, page) -> list[list[str]]:
        return page.evaluate(
            "() => [...document.querySelectorAll('#events tbody tr')]"
            ".map((tr) => [...tr.cells].map((c) => c.innerText))"
        )

    def test_the_list_updates_live_over_one_connection(self):
        old = ExampleTask.objects.create(status="completed")
        page = self.open(LIST)
        key = f"demo/ExampleTask/{old.pk}"
        self.wait(page, "(key) => document.querySelector(`tr[data-key='${key}']`)", key)
        self.wait_live(page)
        page.evaluate("() => { window.sameDocument = true; }")
        task = ScriptedTask.objects.create(steps=8, delay=0.5, result={"ok": True})
        key = f"testapp/ScriptedTask/{task.pk}"
        self.wait(page, "(key) => document.querySelector(`tr[data-key='${key}'][data-status=running]`)", key)
        self.assertEqual(self.row(page, key)["index"], 0)  # newest first: above the old one
        self.wait(
            page,
            "(key) => /Step [3-8]/.test(document.querySelector(`tr[data-key='${key}']`).innerText)",
            key,
        )
        self.wait(
            page, "(key) => document.querySelector(`tr[data-key='${key}'][data-status=completed]`)", key
        )
        row = self.row(page, key)
        self.assertIn("Completed", row["text"])
        self.assertIn("complete", row["text"])
        self.assertTrue(page.evaluate("() => window.sameDocument"))  # never reloaded
        streams = page.evaluate("() => window.streamRequests")
        # One connection for the whole list, and one more for testapp.Report, whose
        # class name otherapp.Report has (events name their model by class only).
        self.assertEqual(len(streams), 2, streams)
        self.assertIn("/stream/?feed=", streams[0])
        self.assertIn("feed=testapp%2FScriptedTask", streams[0])
        self.assertEqual(streams[1].split("?")[1], "feed=testapp%2FReport")

    def test_two_apps_models_of_one_class_name_keep_their_rows_apart_live(self):
        # testapp.Report and otherapp.Report with one pk: their events both say
        # _model "Report", _task_id 4242; each row and the task page stay its own.
        listing = self.open(LIST)
        self.wait_live(listing)
        listing.evaluate("() => { window.sameDocument = true; }")
        theirs = OtherReport.objects.create(pk=4242, steps=600, delay=0.1)
        ours = Report.objects.create(pk=4242, steps=3, delay=0.1, result={"app": "testapp"})
        ours_key, theirs_key = f"testapp/Report/{ours.pk}", f"otherapp/Report/{theirs.pk}"
        row_is = "([key, status]) => document.querySelector(`tr[data-key='${key}'][data-status=${status}]`)"
        self.wait(listing, row_is, [ours_key, "completed"])
        self.wait(
            listing,
            "(key) => /Step ([2-9]|[1-9][0-9])/"
            ".test(document.querySelector(`tr[data-key='${key}']`)?.innerText)",
            theirs_key,
        )
        self.assertIn('{"app":"testapp"}', self.row(listing, ours_key)["text"])  # its complete event
        self.assertEqual(self.row(listing, theirs_key)["status"], "running")
        self.assertIn("(otherapp)", self.row(listing, theirs_key)["text"])
        # The task page of one of them tails its own stream (/stream/otherapp/Report/4242).
        detail = self.open(f"/streaming/otherapp/Report/{theirs.pk}/")
        self.wait(detail, "() => document.querySelectorAll('#events tbody tr').length >= 2")
        self.assertEqual(detail.evaluate("() => document.getElementById('tail-state').dataset.state"), "open")
        theirs.cancel()
        self.wait(detail, "() => document.getElementById('task-status').textContent === 'Cancelled'")
        self.wait(listing, row_is, [theirs_key, "cancelled"])
        self.assertEqual(self.row(listing, ours_key)["status"], "completed")
        shown = listing.evaluate("""() => [...document.querySelectorAll('#tasks tbody tr')]
            .map((tr) => tr.dataset.key).filter((key) => key.endsWith('/Report/4242'))""")
        self.assertEqual(sorted(shown), [theirs_key, ours_key])
        self.assertTrue(listing.evaluate("() => window.sameDocument"))  # live, never reloaded
        # Each Report on a connection of its own: otherapp's with the other models, testapp's alone.
        streams = listing.evaluate("() => window.streamRequests")
        self.assertEqual(len(streams), 2, streams)
        self.assertIn("feed=otherapp%2FReport", streams[0])
        self.assertEqual(streams[1].split("?")[1], "feed=testapp%2FReport")

    def test_a_burst_of_new_tasks_costs_a_few_requests(self):
        page = self.open(LIST)
        self.wait_live(page)
        # One commit; the runner sees it without post_save (SQLite: its data_version watch).
        ScriptedTask.objects.bulk_create([ScriptedTask(steps=2, delay=0.3) for _ in range(30)])
        self.wait(
            page, "() => document.querySelectorAll('#tasks tbody tr[data-status=completed]').length === 30"
        )
        requests = page.evaluate("() => window.rowRequests")
        # The first page, then rows read in batches (new ones, then their ends), not one per task and event.
        self.assertLessEqual(len(requests), 12, requests)
        self.assertTrue(any(url.count("id=") > 1 for url in requests), requests)

    def test_live_rows_follow_the_filters(self):
        page = self.open(f"{LIST}?model=demo.ExampleTask")
        self.wait_live(page)
        streams = page.evaluate("() => window.streamRequests")
        self.assertEqual([s.split("?")[1] for s in streams], ["feed=demo%2FExampleTask"])
        ScriptedTask.objects.create(steps=1)
        example = ExampleTask.objects.create(total_steps=1, step_delay=0.05)
        self.wait(
            page, "(key) => document.querySelector(`tr[data-key='${key}']`)", f"demo/ExampleTask/{example.pk}"
        )
        self.assertEqual(page.evaluate("() => document.querySelectorAll('#tasks tbody tr').length"), 1)

    def test_the_task_page_starts_a_task_and_tails_its_log(self):
        task = ScriptedTask.objects.create(
            status="created", steps=4, delay=0.3, result={"answer": "<b>42</b>"}
        )
        page = self.open(page_path := f"/streaming/testapp/ScriptedTask/{task.pk}/")
        self.wait(page, "() => document.getElementById('tail-state').dataset.state === 'open'")
        self.click(page, "form[action$='/start'] button")
        self.assertEqual(page.page.url, f"{self.server.url}{page_path}")
        self.assertIn(
            f"ScriptedTask {task.pk} queued",
            page.evaluate("() => document.querySelector('.messages').innerText"),
        )
        page.evaluate("() => { window.sameDocument = true; }")
        self.wait(page, "() => document.getElementById('task-status').textContent === 'Completed'")
        rows = self.events(page)
        self.assertEqual([r[0] for r in rows], ["1", "2", "3", "4", "5"])
        self.assertEqual([r[1] for r in rows], ["step"] * 4 + ["complete"])
        self.assertEqual(json.loads(rows[1][2]), {"step": 2, "attempt": 1})
        self.wait(page, "() => !document.getElementById('final-value').hidden")
        shown = page.evaluate("() => document.getElementById('final-value').textContent")
        self.assertEqual(json.loads(shown), {"answer": "<b>42</b>"})  # as text, not HTML
        self.assertEqual(page.evaluate("() => document.querySelectorAll('#task-result b').length"), 0)
        visible = page.evaluate(
            "() => [...document.querySelectorAll('.actions form')]"
            ".filter((f) => !f.hidden).map((f) => f.action.split('/').pop())"
        )
        self.assertEqual(visible, ["rerun"])
        self.assertTrue(page.evaluate("() => window.sameDocument"))

    def test_cancel_then_run_again(self):
        task = ScriptedTask.objects.create(steps=500, delay=0.1)
        page = self.open(f"/streaming/testapp/ScriptedTask/{task.pk}/")
        self.wait(page, "() => document.querySelectorAll('#events tbody tr').length >= 2")
        self.click(page, "form[action$='/cancel'] button")
        self.assertIn(
            "Cancellation requested", page.evaluate("() => document.querySelector('.messages').innerText")
        )
        self.wait(page, "() => document.getElementById('task-status').textContent === 'Cancelled'")
        # The page after the cancel's redirect may say Cancelled before its
        # event log has loaded: the log's end is waited for in its own right.
        self.wait(
            page,
            "() => [...document.querySelectorAll('#events tbody tr')]"
            ".some((tr) => tr.cells[1].innerText === 'cancelled')",
        )
        rows = self.events(page)
        self.assertEqual(rows[-1][1], "cancelled")
        # The stream ended as it should: not shown as a failure of the live connection.
        self.wait(page, "() => document.querySelector('[data-live]').dataset.live === 'ended'")
        self.assertEqual([int(r[0]) for r in rows], list(range(1, len(rows) + 1)))
        self.wait(page, "() => !document.querySelector(\"form[action$='/rerun']\").hidden")
        self.click(page, "form[action$='/rerun'] button")
        new = ScriptedTask.objects.latest("pk")
        self.assertNotEqual(new.pk, task.pk)
        self.assertEqual(page.page.url, f"{self.server.url}/streaming/testapp/ScriptedTask/{new.pk}/")
        self.assertIn(
            f"runs again as ScriptedTask {new.pk}",
            page.evaluate("() => document.querySelector('.messages').innerText"),
        )
        self.wait(page, "() => document.querySelectorAll('#events tbody tr').length >= 1")
        new.cancel()
        self.wait(page, "() => document.getElementById('task-status').textContent === 'Cancelled'")

    def test_readable_on_a_phone(self):
        task = ExampleTask.objects.create(
            status="completed", message="a long message " * 10, final_value={"text": "word " * 60}
        )
        log(task, "progress", "complete", payload='{{"message": "{seq} ' + "x" * 300 + '"}}')
        for path in (LIST, page(task)):
            with self.subTest(path=path):
                phone = self.open(path, width=390)
                self.wait(phone, "() => document.querySelector('tbody tr')")
                layout = phone.evaluate(
                    """() => ({
                      overflow: document.documentElement.scrollWidth - window.innerWidth,
                      header: getComputedStyle(document.querySelector('thead')).display,
                    })"""
                )
                self.assertLessEqual(layout["overflow"], 0, "no sideways scrolling")
                self.assertEqual(layout["header"], "none")  # rows are labelled cards instead

    def test_the_pages_recover_after_the_server_restarts(self):
        # The class's server: a second server on the same database would run
        # tasks whose events (in-memory broker) this one's clients never see.
        server = self.server
        # RETRY: the restarted server runs it again (a retry event, then its steps anew).
        task = ScriptedTask.objects.create(status="created", steps=10, delay=0.4, result={"done": 1})
        listing = self.open(LIST, server)
        detail = self.open(f"/streaming/testapp/ScriptedTask/{task.pk}/", server)
        self.wait_live(listing)
        self.wait(detail, "() => document.getElementById('tail-state').dataset.state === 'open'")
        task.start()
        self.wait(detail, "() => document.querySelectorAll('#events tbody tr').length >= 2")
        server.stop()
        self.wait(listing, "() => document.querySelector('[data-live]').dataset.live !== 'open'")
        server.start()
        self.wait(
            detail, "() => document.getElementById('task-status').textContent === 'Completed'", timeout=40
        )
        seqs = [int(r[0]) for r in self.events(detail)]
        self.assertEqual(seqs, sorted(set(seqs)), "no line lost to reordering or repeated")
        types = [r[1] for r in self.events(detail)]
        self.assertIn("retry", types, self.events(detail))
        self.assertEqual(types[-1], "complete")
        self.wait_live(listing)
        later = ScriptedTask.objects.create(steps=2, delay=0.2)
        key = f"testapp/ScriptedTask/{later.pk}"
        self.wait(
            listing, "(key) => document.querySelector(`tr[data-key='${key}'][data-status=completed]`)", key
        )


class DemoProjectTests(TestCase):
    def test_the_front_page_links_the_dashboard(self):
        response = Client().get("/")
        self.assertContains(response, '<a href="/streaming/">The live dashboard</a>')

    def test_demo_user_makes_a_staff_user_who_may_use_the_dashboard(self):
        out = StringIO()
        call_command("demo_user", "--url", "http://127.0.0.1:9999/streaming/", stdout=out)
        username, password = out.getvalue().split("demo user: ")[1].split("\n")[0].split(" / ")
        self.assertIn("Dashboard: http://127.0.0.1:9999/streaming/", out.getvalue())
        client = Client()
        self.assertTrue(client.login(username=username, password=password))
        listing = client.get(LIST)
        self.assertEqual(listing.status_code, 200)
        # The demo's models, and the @task runs the demo settings route to this server.
        self.assertEqual(
            listing.context["config"]["feeds"],
            ["demo/ContinueTask", "demo/ExampleTask", "streaming/EnqueuedTask"],
        )
        task = ExampleTask.objects.create(status="completed")
        self.assertEqual(client.post(f"{page(task)}rerun").status_code, 302)  # add
        user = User.objects.get(username=username)
        self.assertTrue(user.is_staff)
        self.assertFalse(user.is_superuser)
        call_command("demo_user", stdout=StringIO())  # again: a new password
        self.assertFalse(Client().login(username=username, password=password))
