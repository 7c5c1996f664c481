"""The dashboard (streaming.urls, mounted at /streaming/ in the demo project).

Views with Django's test client: who may see it (anonymous, non-staff,
staff, per-model permissions, the DASHBOARD_ACCESS hook), the JSON list
(filters, order, pages, bad input), the task page, and the actions'
permission checks and answers. DashboardBrowserTests (end of file) drive
the pages in Chromium against a real server.
"""

import json
import unittest

from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.contrib.messages import get_messages
from django.contrib.staticfiles import finders
from django.db import connection
from django.test import Client, TestCase, TransactionTestCase, override_settings

from demo.models import ContinueTask, ExampleTask
from streaming.models import Status
from streaming.tests.testapp.models import OwnedTask, PrivateTask, ScriptedTask

from .support import ServerProcess, wait_for
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
        self.assertEqual(listing.context["config"]["feeds"], ["demo/ExampleTask"])  # the one live connection's feeds
        self.assertEqual([r["key"] for r in self.rows(client)["tasks"]], [f"ExampleTask/{example.pk}"])
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


class ListTests(DashboardCase):
    def test_rows_newest_first_across_models_with_their_latest_event(self):
        first = ExampleTask.objects.create(status="completed")
        second = ContinueTask.objects.create(status="running")
        third = ScriptedTask.objects.create(status="pending")
        log(second, "started", "final", payload='{{"message": "step {seq}"}}')
        tasks = self.rows()["tasks"]
        keys = [r["key"] for r in tasks]
        self.assertEqual(
            keys[:3], [f"ScriptedTask/{third.pk}", f"ContinueTask/{second.pk}", f"ExampleTask/{first.pk}"]
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
        self.assertEqual([r["key"] for r in rows], [f"ExampleTask/{done.pk}"])
        listing = self.client.get(LIST, {"model": "demo.ExampleTask", "status": "completed"})
        self.assertContains(listing, '<option value="demo.ExampleTask" selected>')
        self.assertContains(listing, '<option value="completed" selected>')
        self.assertEqual(listing.context["config"]["feeds"], ["demo/ExampleTask"])

    def test_pages(self):
        ExampleTask.objects.bulk_create([ExampleTask(status="completed", message=str(n)) for n in range(51)])
        first, second = self.rows(), self.rows(page=2)
        self.assertEqual((len(first["tasks"]), first["has_next"]), (50, True))
        self.assertEqual((len(second["tasks"]), second["has_next"]), (1, False))
        self.assertFalse({r["key"] for r in first["tasks"]} & {r["key"] for r in second["tasks"]})

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

    def test_bad_input_gets_400_with_a_message(self):
        cases = {
            (("status", "done"),): "Unknown status 'done': use one of created, pending",
            (("model", "demo.Nope"),): "Unknown model 'demo.Nope'",
            (("page", "0"),): "Bad page '0'",
            (("page", "x"),): "Bad page 'x'",
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

    def test_a_failed_task_shows_its_error(self):
        task = ExampleTask.objects.create(status="failed", error="Traceback (most recent call last)\nKeyError")
        log(task, "error", payload='{{"message": "missing key", "type": "KeyError"}}')
        response = self.client.get(page(task))
        self.assertContains(response, "<strong>KeyError</strong>: missing key")
        self.assertContains(response, "<summary>Traceback</summary>")

    def test_actions_shown_by_permission_and_status(self):
        running = ExampleTask.objects.create(status="running")
        response = self.client.get(page(running))
        self.assertContains(response, "csrfmiddlewaretoken")
        self.assertContains(response, f'action="{page(running)}cancel" data-when="created pending running">')
        self.assertContains(response, f'action="{page(running)}rerun" data-when="completed failed cancelled" hidden>')
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
        self.assertEqual(self.message(response), f"ExampleTask {done.pk} had already finished (completed): nothing to cancel")

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
