"""The JavaScript client (static/streaming/streaming.js) in a real Chromium against real servers.

Pages import the module the server itself serves (DEBUG: runserver_stream
serves static files then), call ``watchTask`` / ``watchTasks`` /
``watchFeed`` and record what they get: every event, every state change,
every request the client sent (through a counting ``fetch``), and how the
result Promise settled. Skipped without Chromium or Playwright, and on the
PostgreSQL pass, as test_browser.py is.
"""

import json
import time
import unittest

import httpx
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.template import Context, Template
from django.test import TransactionTestCase

from demo.models import ExampleTask
from streaming.tests.otherapp.models import Report as OtherReport
from streaming.tests.testapp.models import FragileTask, PrivateTask, Report, ScriptedTask

from .support import REPO, ServerProcess, wait_for
from .tcpproxy import TcpProxy
from .test_browser import CHROMIUM, NOT_ON_SQLITE, Browser, browser_missing, require, session_cookie_value

MODULE = "/static/streaming/streaming.js"

# Starts a watch in the page and records into window.log what it gets. The
# options are JSON; `tokens` (a list) becomes a token function that hands
# them out one per connection.
START = """
async ([kind, target, options]) => {
  const client = await import("__MODULE__");
  const log = {events: [], states: [], requests: [], result: null, done: null, tasks: []};
  window.log = log;
  const countingFetch = (input, init) => {
    log.requests.push({url: String(input), headers: {...(init && init.headers)}});
    return fetch(input, init);
  };
  const tokens = options.tokens;
  delete options.tokens;
  const settled = (promise, into) => promise.then(
    (value) => { log[into] = {value: value === undefined ? null : value}; },
    (error) => { log[into] = {error: {name: error.name, message: error.message, reason: error.reason,
                                      status: error.status, type: error.type}}; },
  );
  const common = {
    ...options,
    fetch: countingFetch,
    onEvent: (event) => log.events.push({type: event.type, id: event.id, key: event.key || null,
                                         name: event.name || null, data: event.data, raw: event.raw}),
    onState: (state) => log.states.push(state),
  };
  if (tokens) common.token = () => tokens.shift();
  if (kind === "task") {
    common.on = {step: (data, event) => log.steps = [...(log.steps || []), [event.id, data.step]]};
    const watch = client.watchTask(target, common);
    window.watch = watch;
    settled(watch.result, "result");
  } else {
    common.onTask = (key) => log.tasks.push(key);
    const watch = kind === "tasks" ? client.watchTasks(target, common) : client.watchFeed(target, common);
    window.watch = watch;
    settled(watch.done, "done");
    log.results = {};
    for (const [key, promise] of watch.results) {
      promise.then(
        (value) => { log.results[key] = {value}; },
        (error) => { log.results[key] = {error: {reason: error.reason, message: error.message}}; },
      );
    }
  }
}
""".replace("__MODULE__", MODULE)


class ClientBrowserCase(TransactionTestCase):
    """One DEBUG server (static files served) and one Chromium for the class."""

    server_settings: dict = {}  # STREAMING settings of the class's server

    @classmethod
    def setUpClass(cls):
        if connection.vendor != "sqlite":
            raise unittest.SkipTest(NOT_ON_SQLITE)
        require(browser_missing())
        super().setUpClass()
        cls.server = ServerProcess(env={"DJANGO_DEBUG": "1"}, **cls.server_settings)
        cls.addClassCleanup(cls.server.stop)
        cls.server.start()
        cls.browser = Browser(CHROMIUM)
        cls.addClassCleanup(cls.browser.close)

    def open(self, origin: str | None = None, user=None):
        origin = origin or self.server.url
        cookies = None
        if user is not None:
            cookies = [
                {"name": settings.SESSION_COOKIE_NAME, "value": session_cookie_value(user), "url": origin}
            ]
        page = self.browser.open(f"{origin}/health", cookies)
        self.addCleanup(page.close)
        return page

    def start(self, page, kind: str, target, **options) -> None:
        page.evaluate(START, [kind, target, options])

    def wait(self, page, condition: str, timeout: float = 20.0) -> None:
        try:
            page.browser.run(
                lambda: page.page.wait_for_function(condition, polling=20, timeout=timeout * 1000),
                timeout=timeout + 10,
            )
        except Exception:
            self.fail(f"the page never saw {condition}: {self.log(page)}; console: {page.console}")

    def start_when_open(self, page, *tasks) -> None:
        """Start tasks created with status 'created' once the page's watch is open, so
        a slow page load cannot let them run past the moment a test acts on."""
        self.wait(page, "() => window.log.states.includes('open')")
        for task in tasks:
            self.assertTrue(task.start())

    def log(self, page) -> dict:
        return page.evaluate("() => window.log")

    def finished(self, page, timeout: float = 20.0, into: str = "result") -> dict:
        self.wait(page, f"() => window.log && window.log.{into} !== null", timeout)
        return self.log(page)

    def assertContiguous(self, events: list[dict], task_id: int, last: int):
        self.assertEqual([e["id"] for e in events], list(range(1, last + 1)), events)
        self.assertEqual({e["data"]["_task_id"] for e in events}, {task_id})


class WatchTaskTests(ClientBrowserCase):
    def test_callbacks_per_type_the_final_value_and_the_end(self):
        task = ScriptedTask.objects.create(steps=3, delay=0.1, result={"total": 3, "html": "<b>x</b>"})
        page = self.open()
        self.start(page, "task", {"model": "ScriptedTask", "id": task.pk}, history=True)
        log = self.finished(page)
        self.assertEqual(log["result"], {"value": {"total": 3, "html": "<b>x</b>"}})
        self.assertEqual(log["steps"], [[1, 1], [2, 2], [3, 3]])  # on.step: (data, event)
        self.assertContiguous(log["events"], task.pk, 4)
        self.assertEqual(log["events"][-1]["type"], "complete")
        self.assertEqual(json.loads(log["events"][0]["raw"]), log["events"][0]["data"])
        self.assertEqual(log["states"], ["connecting", "open", "ended"])
        self.assertEqual(len(log["requests"]), 1)  # closed on the terminal event, never reopened
        self.assertEqual(log["requests"][0]["headers"]["Accept"], "text/event-stream")
        self.assertIn("history=all", log["requests"][0]["url"])
        self.assertEqual(page.evaluate("() => window.watch.lastEventId"), 4)

    def test_a_value_the_complete_event_leaves_open_is_read_from_the_status(self):
        # A list is sent as {"result": [...]}, None as {}: a task may return those dicts too.
        for returned in ([1, 2], None, {"result": 3}, {}):
            with self.subTest(returned=returned):
                task = ScriptedTask.objects.create(steps=1, result=returned)
                page = self.open()
                self.start(page, "task", {"model": "ScriptedTask", "id": task.pk}, history=True)
                log = self.finished(page)
                self.assertEqual(log["result"], {"value": returned})
                self.assertEqual(
                    [r["headers"]["Accept"] for r in log["requests"]],
                    ["text/event-stream", "application/json"],
                )

    def test_error_and_cancelled_reject_the_result(self):
        failing = FragileTask.objects.create(steps=3, fail_at=2)
        page = self.open()
        self.start(page, "task", f"/stream/FragileTask/{failing.pk}", history=True)
        log = self.finished(page)
        self.assertEqual(
            log["result"]["error"],
            {
                "name": "StreamError",
                "message": "failing at step 2 as scripted",
                "reason": "error",
                "status": None,
                "type": "ValueError",
            },
        )
        self.assertEqual([e["type"] for e in log["events"]], ["step", "error"])
        self.assertEqual(log["states"][-1], "failed")

        long = ScriptedTask.objects.create(steps=100, delay=0.1)
        page = self.open()
        self.start(page, "task", {"model": "ScriptedTask", "id": long.pk})
        self.wait(page, "() => window.log.events.length > 0")
        long.cancel()
        log = self.finished(page)
        self.assertEqual(log["result"]["error"]["reason"], "cancelled")
        self.assertEqual(log["events"][-1]["type"], "cancelled")

    def test_a_204_settles_from_the_json_status(self):
        task = ScriptedTask.objects.create(steps=2, result=[1, 2])
        wait_for(lambda: ScriptedTask.objects.get(pk=task.pk).status == "completed", message="the task's end")
        page = self.open()
        self.start(
            page, "task", {"model": "ScriptedTask", "id": task.pk}, after=3
        )  # after the complete event
        log = self.finished(page)
        self.assertEqual(log["result"], {"value": [1, 2]})
        self.assertEqual(log["events"], [])
        self.assertEqual(len(log["requests"]), 2, log["requests"])
        self.assertEqual(log["requests"][0]["headers"]["Last-Event-ID"], "3")
        self.assertEqual(log["requests"][1]["headers"]["Accept"], "application/json")
        self.assertEqual(log["states"][-1], "ended")

    def test_refusals_are_final_and_say_why(self):
        private = PrivateTask.objects.create(steps=1, delay=5)
        page = self.open()
        for target, status in (
            (f"/stream/PrivateTask/{private.pk}", 403),
            ("/stream/ScriptedTask/999999", 404),
            ("/health", 200),  # a page, not a stream: a wrong URL is not retried for ever
        ):
            with self.subTest(status=status):
                self.start(page, "task", target)
                log = self.finished(page)
                self.assertEqual(log["result"]["error"]["reason"], "http")
                self.assertEqual(log["result"]["error"]["status"], status)
                self.assertIn(str(status), log["result"]["error"]["message"])
                self.assertEqual(len(log["requests"]), 1)  # no retry
                self.assertEqual(log["states"], ["connecting", "failed"])

    def test_a_session_user_with_the_view_permission(self):
        admin = User.objects.create_superuser("admin", "a@example.com", "pw")
        task = PrivateTask.objects.create(steps=2, delay=0.05, result={"ok": True})
        page = self.open(user=admin)
        self.start(page, "task", {"model": "PrivateTask", "id": task.pk}, history=True)
        self.assertEqual(self.finished(page)["result"], {"value": {"ok": True}})

    def test_bearer_tokens_and_a_fresh_token_after_expiry(self):
        task = PrivateTask.objects.create(status="created", steps=8, delay=0.4, result={"done": True})
        page = self.open()
        short, fresh = task.stream_token(expires_in=1.5), task.stream_token(expires_in=60)
        self.start(page, "task", {"model": "PrivateTask", "id": task.pk}, history=True, tokens=[short, fresh])
        self.start_when_open(page, task)
        log = self.finished(page, timeout=30)
        self.assertEqual(log["result"], {"value": {"done": True}})
        task_events = [e for e in log["events"] if e["id"] is not None]
        self.assertContiguous(task_events, task.pk, 9)  # nothing lost or repeated across the expiry
        self.assertIn("access_expired", [e["type"] for e in log["events"]])
        sent = [r["headers"].get("Authorization") for r in log["requests"]]
        self.assertEqual(sent, [f"Bearer {short}", f"Bearer {fresh}"])
        types = [e["type"] for e in log["events"]]
        before_expiry = [e for e in log["events"][: types.index("access_expired")] if e["id"] is not None]
        self.assertEqual(log["requests"][1]["headers"]["Last-Event-ID"], str(before_expiry[-1]["id"]))

    def test_an_expired_token_without_a_new_one_rejects(self):
        task = PrivateTask.objects.create(status="created", steps=20, delay=0.3)
        page = self.open()
        self.start(
            page, "task", {"model": "PrivateTask", "id": task.pk}, token=task.stream_token(expires_in=1)
        )
        self.start_when_open(page, task)
        log = self.finished(page)
        self.assertEqual(log["result"]["error"]["reason"], "access_expired")
        self.assertEqual(len(log["requests"]), 1)
        task.cancel()

    def test_resumes_after_the_connection_drops(self):
        task = ScriptedTask.objects.create(status="created", steps=8, delay=0.25)
        with TcpProxy("127.0.0.1", self.server.port) as proxy:
            page = self.open(f"http://127.0.0.1:{proxy.port}")
            self.start(page, "task", {"model": "ScriptedTask", "id": task.pk}, history=True)
            self.start_when_open(page, task)
            self.wait(page, "() => window.log.events.length >= 3")
            proxy.reset()
            log = self.finished(page, timeout=30)
        self.assertContiguous(log["events"], task.pk, 9)
        self.assertIn("reconnecting", log["states"])
        self.assertGreaterEqual(len(log["requests"]), 2)
        resumed = int(log["requests"][1]["headers"]["Last-Event-ID"])
        self.assertGreaterEqual(resumed, 3)
        self.assertNotIn("history=all", log["requests"][1]["url"])


class RestartTests(ClientBrowserCase):
    def test_resumes_after_the_server_restarts(self):
        # RETRY: the restarted server runs the task again, numbering above what was sent.
        task = ScriptedTask.objects.create(status="created", steps=6, delay=0.3, result={"ok": 1})
        page = self.open()
        self.start(page, "task", {"model": "ScriptedTask", "id": task.pk}, history=True)
        self.start_when_open(page, task)
        self.wait(page, "() => window.log.events.length >= 2")
        self.server.stop()
        self.server.start()
        log = self.finished(page, timeout=40)
        ids = [e["id"] for e in log["events"]]
        self.assertEqual(ids, sorted(set(ids)), "events in order, none repeated")
        self.assertEqual(log["events"][-1]["type"], "complete")
        self.assertIn("retry", [e["type"] for e in log["events"]])
        self.assertEqual(log["result"], {"value": {"ok": 1}})
        self.assertIn("reconnecting", log["states"])


class MultiplexedTests(ClientBrowserCase):
    """watchTasks / watchFeed: many tasks over one connection, a cursor per task."""

    def per_task(self, log: dict) -> dict[str, list[int]]:
        ids: dict[str, list[int]] = {}
        for event in log["events"]:
            if event["key"]:
                ids.setdefault(event["key"], []).append(event["id"])
        return ids

    def test_several_tasks_on_one_connection(self):
        one = ScriptedTask.objects.create(steps=3, delay=0.1, result=[1, "two"])
        two = FragileTask.objects.create(steps=3, delay=0.1, fail_at=3)
        page = self.open()
        targets = [f"ScriptedTask/{one.pk}", {"model": "FragileTask", "id": two.pk, "app": "testapp"}]
        self.start(page, "tasks", targets, history=True)
        self.wait(page, "() => window.log.done !== null && Object.keys(window.log.results).length === 2")
        log = self.log(page)
        self.assertEqual(log["done"], {"value": None})
        self.assertEqual(log["results"][f"ScriptedTask/{one.pk}"], {"value": [1, "two"]})
        self.assertEqual(
            log["results"][f"FragileTask/{two.pk}"],
            {"error": {"reason": "error", "message": "failing at step 3 as scripted"}},
        )
        self.assertEqual(
            self.per_task(log), {f"ScriptedTask/{one.pk}": [1, 2, 3, 4], f"FragileTask/{two.pk}": [1, 2, 3]}
        )
        streams = [r for r in log["requests"] if r["headers"]["Accept"] == "text/event-stream"]
        self.assertEqual(len(streams), 1)  # one connection for both
        # ... and the list's value read from the task's JSON status (the event sent {"result": [...]})
        self.assertEqual(
            [r["url"] for r in log["requests"] if r["headers"]["Accept"] == "application/json"],
            [f"{self.server.url}/stream/ScriptedTask/{one.pk}"],
        )
        url = streams[0]["url"]
        self.assertIn(f"task=ScriptedTask%2F{one.pk}", url)
        self.assertIn(f"task=testapp%2FFragileTask%2F{two.pk}", url)
        self.assertEqual(log["states"][-1], "ended")

    def test_resumes_every_task_at_its_cursor_after_a_drop(self):
        tasks = [ScriptedTask.objects.create(status="created", steps=8, delay=0.25) for _ in range(2)]
        with TcpProxy("127.0.0.1", self.server.port) as proxy:
            page = self.open(f"http://127.0.0.1:{proxy.port}")
            self.start(page, "tasks", [f"ScriptedTask/{t.pk}" for t in tasks], history=True)
            self.start_when_open(page, *tasks)
            self.wait(page, "() => window.log.events.length >= 6")
            proxy.reset()
            self.wait(page, "() => window.log.done !== null", timeout=30)
        log = self.log(page)
        self.assertEqual(self.per_task(log), {f"ScriptedTask/{t.pk}": list(range(1, 10)) for t in tasks})
        self.assertGreaterEqual(len(log["requests"]), 2)
        resumed = log["requests"][1]["url"]
        self.assertRegex(resumed, rf"task=ScriptedTask%2F{tasks[0].pk}%40\d+")  # Model/id@cursor
        self.assertIn("reconnecting", log["states"])

    def test_a_feed_brings_tasks_that_start_later(self):
        page = self.open()
        self.start(page, "feed", "testapp/ScriptedTask")
        self.wait(page, "() => window.log.states.includes('open')")
        task = ScriptedTask.objects.create(steps=3, delay=0.05)
        self.wait(page, "() => window.log.events.some((e) => e.type === 'complete')")
        log = self.log(page)
        key = f"ScriptedTask/{task.pk}"
        self.assertEqual(log["tasks"], [key])  # onTask, once
        self.assertEqual(self.per_task(log), {key: [1, 2, 3, 4]})
        self.assertIsNone(log["done"])  # a feed stays open
        page.evaluate("() => window.watch.close()")
        self.wait(page, "() => window.log.done !== null")
        self.assertEqual(self.log(page)["states"][-1], "closed")
        self.assertIn("feed=testapp%2FScriptedTask", log["requests"][0]["url"])

    def test_a_feed_of_an_app_qualified_model_resumes_its_tasks_by_that_name(self):
        # testapp.Report and otherapp.Report: events say only _model "Report",
        # and task=Report/<id> is ambiguous (a 404, which would end the watch).
        ambiguous = httpx.get(f"{self.server.url}/stream/?task=Report/1")
        self.assertEqual(ambiguous.status_code, 404)
        self.assertIn("ambiguous", ambiguous.text)
        theirs = OtherReport.objects.create(status="created", steps=8, delay=0.25, result={"app": "otherapp"})
        ours = Report.objects.create(status="created", steps=8, delay=0.25)  # not on the feed
        with TcpProxy("127.0.0.1", self.server.port) as proxy:
            page = self.open(f"http://127.0.0.1:{proxy.port}")
            self.start(page, "feed", "otherapp/Report")
            self.start_when_open(page, theirs, ours)
            self.wait(page, "() => window.log.events.length >= 3")
            proxy.reset()
            self.wait(page, "() => window.log.events.some((e) => e.type === 'complete')", timeout=30)
        log = self.log(page)
        key = f"Report/{theirs.pk}"
        self.assertEqual(self.per_task(log), {key: list(range(1, 10))})  # nothing lost or repeated
        self.assertEqual(log["events"][-1]["data"]["app"], "otherapp")
        self.assertEqual({e["name"] for e in log["events"]}, {f"otherapp/Report/{theirs.pk}"})
        self.assertEqual(log["tasks"], [key])
        self.assertIn("reconnecting", log["states"])
        self.assertNotIn("failed", log["states"])
        self.assertIsNone(log["done"])  # the feed goes on
        resumed = log["requests"][1]["url"]
        self.assertRegex(resumed, rf"task=otherapp%2FReport%2F{theirs.pk}%40\d+")  # app/Model/id@cursor
        self.assertIn("feed=otherapp%2FReport", resumed)
        page.evaluate("() => window.watch.close()")
        ours.cancel()

    def test_two_models_of_one_class_name_cannot_share_a_watch(self):
        page = self.open()
        errors = page.evaluate(
            """async () => {
              const client = await import("__MODULE__");
              const attempt = (spec) => {
                try {
                  client.watchStreams(spec).close();
                  return null;
                } catch (error) {
                  return `${error.name}: ${error.message}`;
                }
              };
              return [
                attempt({feeds: ["testapp/Report", "otherapp/Report"]}),
                attempt({tasks: ["testapp/Report/7"], feeds: ["otherapp/Report"]}),
                attempt({tasks: ["testapp/Report/7", "otherapp/Report/7"]}),
                attempt({tasks: ["testapp/Report/7", "otherapp/Report/8"]}),  // ids apart: fine
                attempt({tasks: ["testapp/Report/7"], feeds: ["Report", "testapp/Report"]}),  // one model
              ];
            }""".replace("__MODULE__", MODULE)
        )
        refusal = r"^TypeError: \w+/Report and \w+/Report share the class name Report\b"
        for error in errors[:3]:
            self.assertRegex(error or "", refusal)
        self.assertEqual(errors[3:], [None, None])

    def test_cursors_given_and_a_204_settled_from_the_statuses(self):
        done = ScriptedTask.objects.create(steps=2, result=["a"])
        failed = FragileTask.objects.create(steps=2, fail_at=2)
        wait_for(
            lambda: (
                ScriptedTask.objects.get(pk=done.pk).status == "completed"
                and FragileTask.objects.get(pk=failed.pk).status == "failed"
            ),
            message="both tasks' ends",
        )
        page = self.open()
        # Both resume after their last event: the server answers 204, the statuses say how they ended.
        targets = [f"ScriptedTask/{done.pk}@3", {"model": "FragileTask", "id": failed.pk, "after": 2}]
        self.start(page, "tasks", targets)
        self.wait(page, "() => window.log.done !== null && Object.keys(window.log.results).length === 2")
        log = self.log(page)
        self.assertEqual(log["results"][f"ScriptedTask/{done.pk}"], {"value": ["a"]})
        self.assertEqual(
            log["results"][f"FragileTask/{failed.pk}"],
            {"error": {"reason": "error", "message": "failing at step 2 as scripted"}},
        )
        self.assertEqual(log["events"], [])
        stream, *statuses = log["requests"]
        self.assertIn(f"task=ScriptedTask%2F{done.pk}%403", stream["url"])
        self.assertIn(f"task=FragileTask%2F{failed.pk}%402", stream["url"])
        self.assertEqual(
            sorted(r["url"] for r in statuses),
            sorted(
                f"{self.server.url}/stream/{name}"
                for name in (f"ScriptedTask/{done.pk}", f"FragileTask/{failed.pk}")
            ),
        )
        self.assertEqual(log["done"], {"value": None})

    def test_a_refused_task_refuses_the_whole_request(self):
        public = ScriptedTask.objects.create(steps=1)
        private = PrivateTask.objects.create(steps=1)
        page = self.open()
        self.start(page, "tasks", [f"ScriptedTask/{public.pk}", f"PrivateTask/{private.pk}"])
        self.wait(page, "() => window.log.done !== null")
        log = self.log(page)
        self.assertEqual(log["done"]["error"]["status"], 403)
        self.assertIn(f"PrivateTask {private.pk}", log["done"]["error"]["message"])
        self.assertEqual(len(log["requests"]), 1)
        self.assertEqual(log["states"][-1], "failed")


class BusyServerTests(ClientBrowserCase):
    server_settings = {"max_streams_per_task": 1}

    def test_a_503_is_retried_after_retry_after(self):
        task = ScriptedTask.objects.create(steps=200, delay=0.05, result={"ok": True})
        # Another client holds the task's one place: the page's first try gets 503, Retry-After: 5.
        with httpx.stream("GET", f"{self.server.url}/stream/ScriptedTask/{task.pk}", timeout=30) as held:
            self.assertEqual(held.status_code, 200)
            page = self.open()
            self.start(page, "task", {"model": "ScriptedTask", "id": task.pk}, history=True)
            self.wait(page, "() => window.log.states.includes('reconnecting')")
        started = time.monotonic()
        log = self.finished(page, timeout=30)
        self.assertEqual(log["result"], {"value": {"ok": True}})
        self.assertContiguous(log["events"], task.pk, 201)
        self.assertEqual(len(log["requests"]), 2)  # the refused one, then the stream
        self.assertEqual(log["states"][:3], ["connecting", "reconnecting", "connecting"])
        self.assertLess(time.monotonic() - started, 20)


class ReadmeSnippetTests(ClientBrowserCase):
    def test_the_readme_template_snippet_works_as_written(self):
        readme = (REPO / "README.md").read_text()
        section = readme.split("## JavaScript client", 1)[1]
        snippet = section.split("```html\n", 1)[1].split("```", 1)[0]
        # The README's model is a project's own Report; the demo's ExampleTask sends the same progress events.
        self.assertIn('model: "Report"', snippet)
        snippet = snippet.replace('model: "Report"', 'model: "ExampleTask"')
        task = ExampleTask.objects.create(status="created", total_steps=2, step_delay=0.2)
        html = Template(snippet).render(Context({"report": task}))
        page = self.open()
        page.browser.run(lambda: page.page.set_content(html))  # same origin: the server's /health
        task.start()
        self.wait(page, "() => document.querySelectorAll('#steps li').length === 2")
        steps = page.evaluate("() => [...document.querySelectorAll('#steps li')].map((li) => li.textContent)")
        self.assertEqual(steps, ["Step 1 of 2", "Step 2 of 2"])
        # Playwright's sync API hands over console messages only while a call of it
        # runs: each look at the list makes one (an evaluate).
        wait_for(
            lambda: (
                page.evaluate("() => true") and any(line.startswith("log: done") for line in page.console)
            ),
            message="the done log",
        )
        done = next(line for line in page.console if line.startswith("log: done"))
        self.assertIn("Task completed successfully", done)
