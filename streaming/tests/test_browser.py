"""Who may watch, and pages of other origins (CORS), in a real browser and over HTTP.

BrowserTests drives a real headless Chromium (Debian's ``/usr/bin/chromium``,
or ``STREAMING_CHROMIUM``; Playwright's own browser download is never used)
with Playwright's sync API against real ``runserver_stream`` servers: pages
open ``EventSource``s and ``fetch``es, and each test asserts what the page
itself received (every SSE message's type and data, the EventSource's
``error`` events and final ``readyState``). Without Chromium or Playwright
the class skips, saying why; with ``STREAMING_REQUIRE_BROWSER=1`` (CI) that
is a failure.

CorsHeaderTests checks the same rules on the wire with httpx: the CORS
headers of every reply, preflights, refusals.

The pages of "another origin" come from a tiny HTTP server in a thread
(``PageServer``): ``http://127.0.0.1:<its port>`` is the allowed origin,
``http://localhost:<its port>`` the same page under an origin nobody allowed.
"""

import json
import os
import threading
import unittest
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client, TransactionTestCase

from demo.models import ExampleTask
from streaming.tests.testapp.models import OwnedTask, PrivateTask

from .support import ServerProcess

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
except ImportError:  # the dev group has it; a bare install may not
    sync_playwright = None

CHROMIUM = os.environ.get("STREAMING_CHROMIUM", "/usr/bin/chromium")
# --disable-background-networking and friends: without them Chromium's own
# connections (updates, sync, field trials) go out at start-up, and a closed
# network refuses them.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CONNECTING, OPEN, CLOSED = 0, 1, 2  # EventSource.readyState
NOT_ON_SQLITE = (
    "the browser and CORS tests run on the SQLite pass only: CORS does not depend on "
    "the database, and a second run would only add to CI's time"
)

# Put into every page before its own scripts: watchStream(url, options) opens an
# EventSource and records what it gets in window.watched; fetchJson(url, init)
# records what a fetch() gets (or the error it fails with).
PAGE_SCRIPT = """
(() => {
  const TERMINAL = new Set(["complete", "error", "cancelled"]);
  window.watchStream = (url, options) => {
    const watched = {received: [], errors: [], opens: 0, done: false};
    const source = new EventSource(url, {withCredentials: options.withCredentials});
    window.watched = watched;
    window.source = source;
    const received = (type, event) => {
      watched.received.push({type: type, data: event.data, id: event.lastEventId});
      if (TERMINAL.has(type) && options.closeOnEnd) {
        source.close();
        watched.done = true;
      }
    };
    for (const type of ["step", "complete", "cancelled", "access_expired", "message"]) {
      source.addEventListener(type, (event) => received(type, event));
    }
    source.addEventListener("error", (event) => {
      if (event instanceof MessageEvent) {  // the task's own "error" event
        received("error", event);
        return;
      }
      watched.errors.push(source.readyState);
      if (source.readyState === EventSource.CLOSED) watched.done = true;
    });
    source.addEventListener("open", () => { watched.opens += 1; });
  };
  window.fetchJson = async (url, init) => {
    try {
      const response = await fetch(url, init);
      return {status: response.status, body: await response.text()};
    } catch (error) {
      return {error: String(error)};
    }
  };
})();
"""
PAGE_HTML = b"<!doctype html><meta charset=utf-8><title>A page</title><p>A page of another origin.</p>\n"


def require(reason: str | None) -> None:
    """Skip with ``reason``; with STREAMING_REQUIRE_BROWSER=1 (CI), fail instead."""
    if reason is None:
        return
    if os.environ.get("STREAMING_REQUIRE_BROWSER") == "1":
        raise AssertionError(f"STREAMING_REQUIRE_BROWSER=1 but {reason}")
    raise unittest.SkipTest(reason)


def browser_missing() -> str | None:
    if sync_playwright is None:
        return "playwright is not installed (it is in the dev group: scripts/bootstrap.sh)"
    if not os.access(CHROMIUM, os.X_OK):
        return (
            f"no Chromium at {CHROMIUM} (apt-get install chromium, or set STREAMING_CHROMIUM "
            "to a Chromium binary)"
        )
    return None


def start_all(*servers: ServerProcess) -> None:
    """Start the servers side by side (each takes a second or so to come up)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        for future in [pool.submit(server.start) for server in servers]:
            future.result()


def session_cookie_value(user) -> str:
    """A real Django session of ``user`` (a row in the test database): the cookie's value."""
    client = Client()
    client.force_login(user)
    return client.cookies[settings.SESSION_COOKIE_NAME].value


class PageServer:
    """A page of another origin: any GET is answered with the same small HTML page."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(PAGE_HTML)))
                self.end_headers()
                self.wfile.write(PAGE_HTML)

            def log_message(self, format, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="page-server", daemon=True)
        self.thread.start()

    def origin(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Browser:
    """One headless Chromium, driven with Playwright's sync API from a thread of its own.

    Playwright's sync API leaves its event loop marked as running in the
    thread that uses it, and Django's ORM refuses to run in such a thread
    (SynchronousOnlyOperation). The tests make rows and sessions between
    page steps, so the browser lives in a one-thread executor and every call
    into it goes through ``run``.
    """

    def __init__(self, executable: str) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chromium")
        self._playwright = None
        self._browser = None
        try:
            self.run(self._launch, executable)
        except BaseException:
            self.close()
            raise

    def _launch(self, executable: str) -> None:
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000
        )

    def run(self, function, *args, timeout: float = 60.0):
        return self._thread.submit(function, *args).result(timeout)

    def open(self, url: str, cookies: list[dict] | None = None) -> "Page":
        """A fresh context (no cookies but ``cookies``) with one page at ``url``."""

        def open_page():
            context = self._browser.new_context()
            if cookies:
                context.add_cookies(cookies)
            context.add_init_script(PAGE_SCRIPT)
            page = context.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            page.goto(url)
            return context, page, console

        return Page(self, *self.run(open_page))

    def close(self) -> None:
        def stop():
            if self._browser is not None:
                self._browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        try:
            self.run(stop, timeout=30)
        finally:
            self._thread.shutdown(wait=True)


class Page:
    def __init__(self, browser: Browser, context, page, console: list[str]) -> None:
        self.browser, self.context, self.page, self.console = browser, context, page, console

    def evaluate(self, script: str, arg=None):
        return self.browser.run(self.page.evaluate, script, arg)

    def watch(self, url: str, *, with_credentials=False, close_on_end=True, timeout=20.0) -> dict:
        """Open ``new EventSource(url)`` in the page and wait until it is done:
        a terminal event arrived (``close_on_end``: the page then closes it, as
        a page would), or the EventSource gave up (readyState CLOSED). What the
        page recorded: received (type, data, id), errors (readyState at each
        error event), opens, and readyState."""
        options = {"withCredentials": with_credentials, "closeOnEnd": close_on_end}
        self.evaluate("([url, options]) => window.watchStream(url, options)", [url, options])
        try:
            self.browser.run(
                lambda: self.page.wait_for_function(
                    "() => window.watched.done", polling=20, timeout=timeout * 1000
                ),
                timeout=timeout + 10,
            )
        except PlaywrightError:
            raise AssertionError(
                f"the page's EventSource for {url} was not done within {timeout}s: "
                f"{self.watched()}; console: {self.console}"
            ) from None
        return self.watched()

    def watched(self) -> dict:
        return self.evaluate("() => ({...window.watched, readyState: window.source.readyState})")

    def fetch_json(self, url: str, headers: dict, credentials: str = "same-origin") -> dict:
        return self.evaluate(
            "([url, init]) => window.fetchJson(url, init)",
            [url, {"headers": headers, "credentials": credentials}],
        )

    def record_requests(self):
        """Record the requests the page sends from now on, as Chromium's DevTools
        sees them (preflights included, which Playwright's own request events
        leave out). Returns a function that gives them in the order they went on
        the wire: method, url, initiator type ("preflight" for one) and the
        headers sent (Origin, Last-Event-ID, ...; lower-cased names)."""
        sent: dict[str, dict] = {}  # DevTools' requestId -> Network.requestWillBeSent
        wire: list[tuple[str, dict]] = []  # (requestId, the headers sent), in order

        def attach():
            devtools = self.context.new_cdp_session(self.page)
            devtools.on("Network.requestWillBeSent", lambda event: sent.update({event["requestId"]: event}))
            devtools.on(
                "Network.requestWillBeSentExtraInfo",
                lambda event: wire.append((event["requestId"], event["headers"])),
            )
            devtools.send("Network.enable")

        def recorded() -> list[dict]:
            return [
                {
                    "method": sent[request_id]["request"]["method"],
                    "url": sent[request_id]["request"]["url"],
                    "initiator": sent[request_id].get("initiator", {}).get("type"),
                    "headers": {name.lower(): value for name, value in headers.items()},
                }
                for request_id, headers in wire
                if request_id in sent
            ]

        self.browser.run(attach)
        return lambda: self.browser.run(recorded)

    def close(self) -> None:
        self.browser.run(self.context.close)


class BrowserTests(TransactionTestCase):
    """A real Chromium against real servers: same-origin pages, other origins, credentials."""

    @classmethod
    def setUpClass(cls):
        if connection.vendor != "sqlite":
            raise unittest.SkipTest(NOT_ON_SQLITE)  # keeps CI's PostgreSQL pass short
        require(browser_missing())
        super().setUpClass()
        cls.pages = PageServer()
        cls.addClassCleanup(cls.pages.stop)
        allowed = cls.pages.origin()
        # plain: no CORS setting at all; cors: one allowed origin, no cookies
        # across origins (the default); credentials: the same, with cookies.
        cls.plain = ServerProcess()
        cls.cors = ServerProcess(cors_allowed_origins=allowed)
        cls.credentials = ServerProcess(cors_allowed_origins=allowed, cors_allow_credentials=1)
        for server in (cls.plain, cls.cors, cls.credentials):
            cls.addClassCleanup(server.stop)
        start_all(cls.plain, cls.cors, cls.credentials)
        cls.browser = Browser(CHROMIUM)
        cls.addClassCleanup(cls.browser.close)

    def open(self, url: str, cookies: list[dict] | None = None) -> Page:
        page = self.browser.open(url, cookies)
        self.addCleanup(page.close)
        return page

    def login_cookie(self, user, server: ServerProcess) -> dict:
        """The user's session cookie, for the host the server is on (cookies ignore ports)."""
        return {"name": settings.SESSION_COOKIE_NAME, "value": session_cookie_value(user), "url": server.url}

    def assertStreamed(self, watched: dict, task, types: list[str]):
        self.assertEqual([m["type"] for m in watched["received"]], types, watched)
        data = [json.loads(m["data"]) for m in watched["received"]]
        self.assertEqual({d["_task_id"] for d in data}, {task.pk}, data)
        self.assertEqual([d["step"] for d in data if "step" in d], list(range(1, types.count("step") + 1)))
        self.assertEqual([m["id"] for m in watched["received"]], [str(n) for n in range(1, len(types) + 1)])
        self.assertEqual(watched["opens"], 1, watched)

    def assertGotNothing(self, watched: dict):
        """The EventSource was refused: no message, never open, an error, and it gave up
        (readyState CLOSED: a 403, or a response the browser may not read, is not retried)."""
        self.assertEqual(watched["received"], [], watched)
        self.assertEqual(watched["opens"], 0, watched)
        self.assertEqual(watched["errors"], [CLOSED], watched)
        self.assertEqual(watched["readyState"], CLOSED, watched)

    def test_a_same_origin_page_streams_a_protected_task_with_the_users_session(self):
        owner = User.objects.create_user("owner", password="pw")
        task = OwnedTask.objects.create(owner=owner, steps=3, delay=0.05)
        # A page the server itself serves (same origin); the browser sends the cookie by itself.
        page = self.open(f"{self.plain.url}/health", cookies=[self.login_cookie(owner, self.plain)])
        watched = page.watch(f"/stream/OwnedTask/{task.pk}?history=all")
        self.assertStreamed(watched, task, ["step", "step", "step", "complete"])
        self.assertEqual(watched["errors"], [], watched)

    def test_an_anonymous_same_origin_page_gets_no_stream_of_a_protected_task(self):
        owner = User.objects.create_user("owner", password="pw")
        task = OwnedTask.objects.create(owner=owner, steps=2)
        page = self.open(f"{self.plain.url}/health")  # no cookie
        self.assertGotNothing(page.watch(f"/stream/OwnedTask/{task.pk}?history=all"))
        # Another user's session is refused as well (the task's hook says no).
        other = User.objects.create_user("other", password="pw")
        page = self.open(f"{self.plain.url}/health", cookies=[self.login_cookie(other, self.plain)])
        self.assertGotNothing(page.watch(f"/stream/OwnedTask/{task.pk}?history=all"))

    def test_an_allowed_origin_streams_a_protected_task_with_a_token_in_the_url(self):
        task = PrivateTask.objects.create(steps=3, delay=0.05)
        page = self.open(self.pages.origin() + "/app.html")
        requests = page.record_requests()
        url = f"{self.cors.url}{task.stream_url(expires_in=60)}&history=all"
        # The page leaves the EventSource open after the last event, as a careless
        # page would: the server ends the stream, the browser reconnects with
        # Last-Event-ID (across origins too), is answered 204 and gives up.
        watched = page.watch(url, close_on_end=False)
        self.assertStreamed(watched, task, ["step", "step", "step", "complete"])
        self.assertEqual(watched["errors"], [CONNECTING, CLOSED], watched)
        # What went on the wire: the reconnect after the end carried Last-Event-ID.
        sent = [
            (r["method"], r["headers"].get("origin"), r["headers"].get("last-event-id"))
            for r in requests()
            if r["url"] == url
        ]
        origin = self.pages.origin()
        self.assertEqual(sent, [("GET", origin, None), ("GET", origin, "4")])

    def test_a_disallowed_origin_gets_nothing_even_with_a_valid_token(self):
        task = PrivateTask.objects.create(steps=2)
        other_origin = self.pages.origin("localhost")  # the same page server, another origin
        page = self.open(other_origin + "/app.html")
        self.assertEqual(page.evaluate("() => location.origin"), other_origin)
        url = f"{self.cors.url}{task.stream_url(expires_in=60)}&history=all"
        self.assertGotNothing(page.watch(url))
        # The server refused it (not merely the browser hiding the answer).
        response = httpx.get(url, headers={"origin": other_origin}, timeout=10)
        self.assertEqual(response.status_code, 403, response.text)
        self.assertNotIn("access-control-allow-origin", response.headers)
        self.assertIn(other_origin, response.text)

    def test_an_allowed_origin_streams_with_the_users_session_where_credentials_are_allowed(self):
        owner = User.objects.create_user("owner", password="pw")
        task = OwnedTask.objects.create(owner=owner, steps=3, delay=0.05)
        server = self.credentials
        page = self.open(self.pages.origin() + "/app.html", cookies=[self.login_cookie(owner, server)])
        url = f"{server.url}/stream/OwnedTask/{task.pk}?history=all"
        # Without withCredentials the browser sends no cookie across origins: nothing.
        self.assertGotNothing(page.watch(url))
        watched = page.watch(url, with_credentials=True)
        self.assertStreamed(watched, task, ["step", "step", "step", "complete"])

    def test_an_allowed_origin_gets_nothing_with_the_users_session_where_credentials_are_not_allowed(self):
        owner = User.objects.create_user("owner", password="pw")
        task = OwnedTask.objects.create(owner=owner, steps=2)
        cookie = self.login_cookie(owner, self.cors)
        page = self.open(self.pages.origin() + "/app.html", cookies=[cookie])
        url = f"{self.cors.url}/stream/OwnedTask/{task.pk}?history=all"
        self.assertGotNothing(page.watch(url, with_credentials=True))
        # The server ignored the cookie: 403, as for an anonymous request.
        response = httpx.get(
            url,
            headers={"origin": self.pages.origin(), "cookie": f"{cookie['name']}={cookie['value']}"},
            timeout=10,
        )
        self.assertEqual(response.status_code, 403, response.text)
        # The same cookie opens it from the server's own origin.
        same_origin = {"origin": self.cors.url, "cookie": f"{cookie['name']}={cookie['value']}"}
        self.assertEqual(
            httpx.get(url, headers={**same_origin, "accept": "application/json"}).status_code, 200
        )

    def test_a_fetch_with_a_bearer_token_from_an_allowed_origin_passes_its_preflight(self):
        task = PrivateTask.objects.create(steps=1)
        headers = {
            "Authorization": f"Bearer {task.stream_token(expires_in=60)}",
            "Accept": "application/json",
        }
        url = f"{self.cors.url}/stream/PrivateTask/{task.pk}"
        # Authorization is not a simple header: the browser asks with OPTIONS first.
        page = self.open(self.pages.origin() + "/app.html")
        requests = page.record_requests()
        got = page.fetch_json(url, headers)
        self.assertEqual(got.get("status"), 200, got)
        sent = [r for r in requests() if r["url"] == url]
        self.assertEqual(
            [(r["method"], r["initiator"]) for r in sent], [("OPTIONS", "preflight"), ("GET", "script")]
        )
        preflight = sent[0]["headers"]
        self.assertEqual(preflight["access-control-request-method"], "GET")
        self.assertIn("authorization", preflight["access-control-request-headers"])
        status = json.loads(got["body"])
        self.assertIn("status", status)
        self.assertEqual((status["id"], status["model"]), (task.pk, "PrivateTask"))
        # From an origin nobody allowed, the preflight is refused and the fetch fails.
        page = self.open(self.pages.origin("localhost") + "/app.html")
        got = page.fetch_json(url, headers)
        self.assertIn("error", got, got)
        self.assertIn("Failed to fetch", got["error"])


class CorsHeaderTests(TransactionTestCase):
    """The CORS rules on the wire (httpx, no browser)."""

    ORIGIN = "http://app.example:8000"
    OTHER = "http://evil.example:8000"

    @classmethod
    def setUpClass(cls):
        if connection.vendor != "sqlite":
            raise unittest.SkipTest(NOT_ON_SQLITE)
        super().setUpClass()
        cls.plain = ServerProcess()
        cls.cors = ServerProcess(cors_allowed_origins=f"{cls.ORIGIN},http://second.example")
        cls.credentials = ServerProcess(cors_allowed_origins=cls.ORIGIN, cors_allow_credentials=1)
        cls.anyone = ServerProcess(cors_allowed_origins="*")
        for server in (cls.plain, cls.cors, cls.credentials, cls.anyone):
            cls.addClassCleanup(server.stop)
        start_all(cls.plain, cls.cors, cls.credentials, cls.anyone)

    def head_of_stream(self, url: str, **headers) -> httpx.Response:
        """The response head of a stream (its body is not read)."""
        with httpx.stream("GET", url, headers=headers, timeout=10) as response:
            return response

    def assertAllows(self, response: httpx.Response, origin: str, credentials=False):
        self.assertEqual(response.headers.get("access-control-allow-origin"), origin, response.headers)
        if origin != "*":
            vary = [v.strip().lower() for v in response.headers.get("vary", "").split(",")]
            self.assertIn("origin", vary, response.headers)
        if credentials:
            self.assertEqual(response.headers.get("access-control-allow-credentials"), "true")
        else:
            self.assertNotIn("access-control-allow-credentials", response.headers)

    def assertNoCors(self, response: httpx.Response):
        cors = [name for name in response.headers if name.startswith("access-control-")]
        self.assertEqual(cors, [], response.headers)

    def test_an_allowed_origin_gets_its_origin_back_on_every_reply(self):
        task = PrivateTask.objects.create(steps=1)
        token = task.stream_token(expires_in=60)
        url = f"{self.cors.url}/stream/PrivateTask/{task.pk}"
        for origin in (self.ORIGIN, "http://second.example"):
            with self.subTest(origin=origin):
                stream = self.head_of_stream(f"{url}?token={token}&history=all", origin=origin)
                self.assertEqual(stream.status_code, 200)
                self.assertEqual(stream.headers["content-type"].split(";")[0], "text/event-stream")
                self.assertAllows(stream, origin)
                status = httpx.get(
                    url,
                    headers={
                        "origin": origin,
                        "accept": "application/json",
                        "authorization": f"Bearer {token}",
                    },
                    timeout=10,
                )
                self.assertEqual(status.status_code, 200, status.text)
                self.assertIn("status", status.json())
                self.assertAllows(status, origin)
                missing = httpx.get(f"{self.cors.url}/stream/ExampleTask/999999", headers={"origin": origin})
                self.assertEqual(missing.status_code, 404, missing.text)
                self.assertAllows(missing, origin)
                refused = httpx.get(url, headers={"origin": origin}, timeout=10)  # no token
                self.assertEqual(refused.status_code, 403, refused.text)
                self.assertAllows(refused, origin)

    def test_any_origin_with_a_star(self):
        task = ExampleTask.objects.create(step_delay=0.01)
        url = f"{self.anyone.url}/stream/ExampleTask/{task.pk}"
        for origin in (self.ORIGIN, self.OTHER, "null"):
            with self.subTest(origin=origin):
                self.assertAllows(self.head_of_stream(f"{url}?history=all", origin=origin), "*")
                status = httpx.get(url, headers={"origin": origin, "accept": "application/json"}, timeout=10)
                self.assertEqual(status.status_code, 200, status.text)
                self.assertAllows(status, "*")

    def test_credentials_when_allowed(self):
        owner = User.objects.create_user("owner", password="pw")
        task = OwnedTask.objects.create(owner=owner, steps=1)
        cookie = f"{settings.SESSION_COOKIE_NAME}={session_cookie_value(owner)}"
        url = f"{self.credentials.url}/stream/OwnedTask/{task.pk}"
        status = httpx.get(
            url, headers={"origin": self.ORIGIN, "cookie": cookie, "accept": "application/json"}
        )
        self.assertEqual(status.status_code, 200, status.text)
        self.assertAllows(status, self.ORIGIN, credentials=True)
        stream = self.head_of_stream(f"{url}?history=all", origin=self.ORIGIN, cookie=cookie)
        self.assertEqual(stream.status_code, 200)
        self.assertAllows(stream, self.ORIGIN, credentials=True)
        # Without CORS_ALLOW_CREDENTIALS the cookie of another origin's page is ignored.
        url = f"{self.cors.url}/stream/OwnedTask/{task.pk}"
        refused = httpx.get(
            url, headers={"origin": self.ORIGIN, "cookie": cookie, "accept": "application/json"}
        )
        self.assertEqual(refused.status_code, 403, refused.text)
        self.assertAllows(refused, self.ORIGIN)

    def test_a_preflight_from_an_allowed_origin(self):
        for server, credentials in ((self.cors, False), (self.credentials, True)):
            with self.subTest(credentials=credentials):
                response = httpx.options(
                    f"{server.url}/stream/PrivateTask/1",
                    headers={
                        "origin": self.ORIGIN,
                        "access-control-request-method": "GET",
                        "access-control-request-headers": "authorization, last-event-id",
                    },
                    timeout=10,
                )
                self.assertEqual(response.status_code, 204, response.text)
                self.assertAllows(response, self.ORIGIN, credentials=credentials)
                methods = [m.strip() for m in response.headers["access-control-allow-methods"].split(",")]
                self.assertIn("GET", methods)
                allowed = [
                    h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
                ]
                self.assertIn("authorization", allowed)
                self.assertIn("last-event-id", allowed)
                self.assertGreater(int(response.headers["access-control-max-age"]), 0)

    def test_a_disallowed_origin_is_refused_whatever_it_asks(self):
        task = PrivateTask.objects.create(steps=1)
        token = task.stream_token(expires_in=60)
        for server in (self.plain, self.cors, self.credentials):
            url = f"{server.url}/stream/PrivateTask/{task.pk}"
            requests = {
                "preflight": ("OPTIONS", url, {"access-control-request-method": "GET"}),
                "stream": ("GET", f"{url}?token={token}", {}),
                "status": ("GET", url, {"authorization": f"Bearer {token}", "accept": "application/json"}),
            }
            for name, (method, target, headers) in requests.items():
                with self.subTest(server=server.streaming, request=name):
                    response = httpx.request(
                        method, target, headers={"origin": self.OTHER, **headers}, timeout=10
                    )
                    self.assertEqual(response.status_code, 403, response.text)
                    self.assertEqual(response.text.count("\n"), 1, "a one-line message")
                    self.assertIn(self.OTHER, response.text)
                    self.assertNoCors(response)

    def test_options_without_an_origin_says_what_is_allowed(self):
        for server in (self.plain, self.cors):
            with self.subTest(server=server.streaming):
                response = httpx.options(f"{server.url}/stream/PrivateTask/1", timeout=10)
                self.assertEqual(response.status_code, 204, response.text)
                self.assertEqual(response.headers.get("allow"), "GET, OPTIONS")
                self.assertNoCors(response)

    def test_a_same_origin_request_needs_no_cors_setting(self):
        task = PrivateTask.objects.create(steps=1)
        token = task.stream_token(expires_in=60)
        url = f"{self.plain.url}/stream/PrivateTask/{task.pk}"
        for origin in (self.plain.url, f"http://localhost:{self.plain.port}"):
            with self.subTest(origin=origin):
                host = origin.removeprefix("http://")
                status = httpx.get(
                    url,
                    headers={
                        "origin": origin,
                        "host": host,
                        "authorization": f"Bearer {token}",
                        "accept": "application/json",
                    },
                    timeout=10,
                )
                self.assertEqual(status.status_code, 200, status.text)
                self.assertNoCors(status)
                stream = self.head_of_stream(f"{url}?token={token}&history=all", origin=origin, host=host)
                self.assertEqual(stream.status_code, 200)
                self.assertNoCors(stream)
        # Another port of the same host is another origin.
        other_port = httpx.get(
            url, headers={"origin": "http://127.0.0.1:1", "authorization": f"Bearer {token}"}
        )
        self.assertEqual(other_port.status_code, 403, other_port.text)
