"""Under the servers people already run: wrapped apps, daphne, several processes,
the worker tier (runtasks), shutdown grace and --reload."""

import asyncio
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import weakref
from pathlib import Path
from unittest import mock

import httpx
from django.test import SimpleTestCase, TransactionTestCase, override_settings

from streaming import checks
from streaming.conf import StreamingSettings, get_settings
from streaming.keys import TaskKey
from streaming.node import Node
from streaming.server import serve as serve_module
from streaming.server.serve import StreamingServer, find_streaming_app, make_config
from streaming.tests.testapp.models import ScriptedTask
from streaming.transports import is_shared
from streaming.web.app import StreamingApp

from .servercase import ServerTestCase
from .support import (
    REPO,
    ServerProcess,
    eventually,
    free_port,
    manage,
    node_settings,
    parse_sse,
    read_stream,
    subprocess_env,
    wait_for,
)
from .wrapped_asgi import ProtocolRouter, TagResponses

HAS_DAPHNE = importlib.util.find_spec("daphne") is not None
NO_DAPHNE = "daphne is not installed: it is a dev dependency (pip install daphne) for the daphne tests"
NEEDS_SHARED = (
    "the worker tier (runtasks beside a web server) needs a shared broker: run the suite with "
    "STREAMING_BROKER_URL=redis://127.0.0.1:6379/0"
)


def status_of(task) -> str:
    task.refresh_from_db()
    return task.status


def pids_started(log: str) -> list[int]:
    """The pids of the nodes started, in order, from a server's log."""
    return [int(pid) for pid in re.findall(r"Streaming node started \([^:]+:(\d+):", log)]


# -- 1. wrapped apps ----------------------------------------------------------------------


class Recorder:
    """The project's own ASGI app: answers everything with 200 and remembers what it got."""

    def __init__(self):
        self.scopes = []

    async def __call__(self, scope, receive, send):
        self.scopes.append((scope["type"], scope.get("path")))
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"own"})


async def call(app, scope_type, path):
    sent = []

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"127.0.0.1")]  # stream requests are checked against ALLOWED_HOSTS
    scope = {"type": scope_type, "path": path, "method": "GET", "headers": headers, "query_string": b""}
    await app(scope, receive, send)
    return sent


class WrappedAppTests(TransactionTestCase):
    def test_get_asgi_application_wraps_the_projects_own_app(self):
        from streaming.asgi import get_asgi_application

        own = Recorder()
        app = get_asgi_application(app=own)
        self.assertIsInstance(app, StreamingApp)
        self.assertIs(app.django_app, own)

    async def test_everything_but_streams_and_health_goes_to_the_wrapped_app(self):
        own = Recorder()
        app = StreamingApp(own, node_factory=lambda: Node(node_settings()))
        try:
            self.assertEqual((await call(app, "http", "/health"))[0]["status"], 200)
            self.assertEqual((await call(app, "http", "/stream/NoSuchTask/1"))[0]["status"], 404)
            self.assertEqual((await call(app, "http", "/admin/"))[1]["body"], b"own")
            await call(app, "websocket", "/ws/chat/")
            self.assertEqual(own.scopes, [("http", "/admin/"), ("websocket", "/ws/chat/")])
        finally:
            await app.shutdown()

    async def test_a_node_started_by_a_request_says_a_stop_will_not_hand_tasks_back(self):
        # No lifespan reached the app and no server started its node: a stop is a crash.
        app = StreamingApp(Recorder(), node_factory=lambda: Node(node_settings()))
        try:
            with self.assertLogs("streaming.web.app", "WARNING") as logs:
                await call(app, "http", "/health")
            self.assertIn("The streaming node started with a request", "\n".join(logs.output))
        finally:
            await app.shutdown()

    async def test_a_node_started_by_the_lifespan_does_not_warn(self):
        app = StreamingApp(Recorder(), node_factory=lambda: Node(node_settings()))
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message["type"])

        with self.assertNoLogs("streaming.web.app", "WARNING"):
            await app({"type": "lifespan"}, receive, send)
        self.assertEqual(sent, ["lifespan.startup.complete", "lifespan.shutdown.complete"])

    def test_runserver_stream_finds_the_streaming_app_inside_middleware_and_routers(self):
        inner = StreamingApp(Recorder())
        outer = ProtocolRouter({"http": TagResponses(inner)})
        self.assertIs(find_streaming_app(outer), inner)
        self.assertIs(find_streaming_app(inner), inner)
        with mock.patch.object(serve_module, "built", weakref.WeakSet()):
            self.assertIsNone(find_streaming_app(Recorder()))
            serve_module.built.add(inner)
            # Wrapped in something that keeps it where we do not look: the only one built.
            self.assertIs(find_streaming_app(Recorder()), inner)

    async def test_the_server_starts_the_node_when_no_lifespan_reaches_it(self):
        inner = StreamingApp(Recorder(), node_factory=lambda: Node(node_settings()))
        outer = ProtocolRouter({"http": TagResponses(inner)})  # refuses the lifespan, as Channels does
        config = make_config(
            outer, host="127.0.0.1", port=0, uds=None, log_level="critical", streaming_app=inner
        )
        server = StreamingServer(config, inner)
        server.install_signal_handlers = lambda: None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await eventually(lambda: server.started or serving.done(), message="the server to start")
            # No request yet: the node runs because the server started it.
            await eventually(lambda: inner.node is not None, message="the node to start")
            task = await ScriptedTask.objects.acreate(steps=1)
            await eventually(lambda: ScriptedTask.objects.filter(pk=task.pk, status="completed").aexists())
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, 10)
            sock.close()
        self.assertTrue(inner._closed, "the server stopped the node on its way out")


class WrappedAppServerTests(ServerTestCase):
    """runserver_stream with ASGI_APPLICATION = Router(Middleware(get_asgi_application(app=Router(own))))."""

    server_settings = {"env": {"DJANGO_SETTINGS_MODULE": "streaming.tests.settings_wrapped"}}

    def test_ordinary_requests_go_through_the_wrapping_app_and_streams_are_taken_over(self):
        health = httpx.get(f"{self.server.url}/health", timeout=5)
        self.assertEqual((health.text, health.headers.get("x-middleware")), ("OK", "seen"))
        self.assertEqual(httpx.get(f"{self.server.url}/own/x", timeout=5).text, "the project's own app")
        admin = httpx.get(f"{self.server.url}/admin/login/", timeout=10)
        self.assertEqual((admin.status_code, admin.headers.get("x-middleware")), (200, "seen"))
        task = ScriptedTask.objects.create(steps=3)
        with httpx.stream("GET", self.url(task, history="all"), timeout=15) as response:
            self.assertEqual(response.headers["connection"], "close")  # the socket path, not ASGI
            events = parse_sse(response.read().decode())
        self.assertEqual([e.event for e in events], ["step", "step", "step", "complete"])
        # The router refused the lifespan; the server started the node itself.
        self.assertIn("'lifespan' protocol appears unsupported", self.server.log())
        self.assertEqual(len(pids_started(self.server.log())), 1)


# -- 2. daphne --------------------------------------------------------------------------------


def daphne_command():
    return [sys.executable, "-m", "daphne", "-p", "{port}", "config.asgi:application"]


@unittest.skipUnless(HAS_DAPHNE, NO_DAPHNE)
class DaphneTests(ServerTestCase):
    """daphne sends no lifespan: the node starts with the first request (the health check)."""

    server_settings = {"command": daphne_command()}

    def test_streams_and_runs_tasks_under_daphne(self):
        self.assertIn("Streaming node started", self.server.log())
        task = ScriptedTask.objects.create(steps=3, delay=0.05)
        with httpx.stream("GET", self.url(task, history="all"), timeout=15) as response:
            self.assertEqual(response.status_code, 200)
            self.assertEqual(response.headers["transfer-encoding"], "chunked")  # the ASGI path
            events = parse_sse(response.read().decode())
        self.assertEqual(
            [(e.id, e.event) for e in events], [(1, "step"), (2, "step"), (3, "step"), (4, "complete")]
        )
        self.assertEqual(status_of(task), "completed")


@unittest.skipUnless(HAS_DAPHNE, NO_DAPHNE)
class DaphneShutdownTests(TransactionTestCase):
    def test_sigterm_hands_running_tasks_back(self):
        server = ServerProcess(command=daphne_command()).start()
        try:
            task = ScriptedTask.objects.create(steps=200, delay=0.05)
            wait_for(lambda: status_of(task) == "running", message="the task to run")
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(15)
            self.assertIn("Streaming node stopped", server.log())
            task.refresh_from_db()
            self.assertEqual((task.status, task.lease_owner), ("pending", None))
        finally:
            server.stop()


# -- 3. processes that cannot see each other ------------------------------------------------


class SeveralProcessesTests(SimpleTestCase):
    def test_signs_of_several_worker_processes(self):
        cases = [
            (["/venv/bin/uvicorn", "app:app", "--workers", "4"], {}, "uvicorn --workers 4"),
            (["/venv/lib/python3.12/site-packages/uvicorn/__main__.py", "a:b", "--workers=2"], {}, "uvicorn"),
            (["/venv/bin/gunicorn", "-w", "3", "-k", "uvicorn.workers.UvicornWorker", "a:b"], {}, "gunicorn"),
            (["/venv/bin/gunicorn", "-w3", "a:b"], {}, "gunicorn --workers 3"),
            (["/venv/bin/gunicorn", "a:b"], {"GUNICORN_CMD_ARGS": "--workers 5"}, "gunicorn --workers 5"),
            (["/venv/bin/uvicorn", "a:b"], {"WEB_CONCURRENCY": "4"}, "WEB_CONCURRENCY=4"),
            (["manage.py", "migrate"], {"WEB_CONCURRENCY": "3"}, "WEB_CONCURRENCY=3"),
            (["/venv/bin/granian", "--workers", "2", "a:b"], {}, "granian"),
        ]
        for argv, environ, expected in cases:
            with self.subTest(argv=argv, environ=environ):
                self.assertIn(expected, checks.several_processes(argv, environ) or "")

    def test_no_sign_of_several_processes(self):
        cases = [
            (["/venv/bin/uvicorn", "app:app"], {}),
            (["/venv/bin/uvicorn", "app:app", "--workers", "1"], {"WEB_CONCURRENCY": "4"}),  # explicit wins
            (["/venv/bin/daphne", "a:b"], {"WEB_CONCURRENCY": "1"}),
            (["manage.py", "runserver_stream"], {"WEB_CONCURRENCY": "4"}),  # checks its own --workers
            (["manage.py", "runtasks"], {"WEB_CONCURRENCY": "4"}),
            (["/venv/bin/gunicorn", "a:b"], {"SERVER_SOFTWARE": "gunicorn/23.0.0"}),  # gunicorn's default: 1
        ]
        for argv, environ in cases:
            with self.subTest(argv=argv, environ=environ):
                self.assertIsNone(checks.several_processes(argv, environ))

    def ids(self, argv=("manage.py", "check"), environ=None):
        with (
            mock.patch.object(sys, "argv", list(argv)),
            mock.patch.dict(os.environ, environ or {}, clear=False),
        ):
            return [message.id for message in checks.check_topology()]

    def test_w001_in_memory_broker_under_several_processes(self):
        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop("WEB_CONCURRENCY", None)
            with override_settings(STREAMING={}):
                self.assertNotIn("streaming.W001", self.ids())
                self.assertIn("streaming.W001", self.ids(environ={"WEB_CONCURRENCY": "4"}))
            with override_settings(STREAMING={"BROKER_URL": "redis://127.0.0.1:6379/0"}):
                self.assertNotIn("streaming.W001", self.ids(environ={"WEB_CONCURRENCY": "4"}))

    def test_w002_a_server_that_runs_no_task_needs_a_shared_broker(self):
        with override_settings(STREAMING={"RUN_TASKS": False}):
            self.assertIn("streaming.W002", self.ids())
        with override_settings(STREAMING={"RUN_TASKS": False, "BROKER_URL": "redis://127.0.0.1:6379/0"}):
            self.assertNotIn("streaming.W002", self.ids())

    def test_w003_djangos_runserver_runs_no_task(self):
        self.assertIn("streaming.W003", self.ids(argv=["manage.py", "runserver"]))
        self.assertNotIn("streaming.W003", self.ids(argv=["manage.py", "runserver_stream"]))

    def test_the_default_shutdown_grace_fits_a_kubernetes_stop(self):
        self.assertEqual(StreamingSettings().SHUTDOWN_GRACE, 25.0)


class SharedModelNameCheckTests(SimpleTestCase):
    def test_i001_two_apps_task_models_of_one_class_name(self):
        # testapp.Report and otherapp.Report (the test settings silence it: on purpose there).
        [info] = checks.check_task_models()
        self.assertEqual(info.id, "streaming.I001")
        self.assertIn("otherapp.Report", info.msg)
        self.assertIn("testapp.Report", info.msg)
        self.assertIn("/stream/<app_label>/<Model>/<id>", info.msg)


class SeveralProcessesServerTests(TransactionTestCase):
    def test_manage_py_check_warns_when_workers_cannot_see_each_other(self):
        env = {**subprocess_env(broker_url=""), "WEB_CONCURRENCY": "4"}
        result = subprocess.run(
            [sys.executable, "manage.py", "check"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("streaming.W001", result.stdout + result.stderr)
        self.assertIn("STREAMING['BROKER_URL']", result.stdout + result.stderr)

    def test_uvicorn_workers_with_the_in_memory_broker_log_a_warning(self):
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--port",
            "{port}",
            "--workers",
            "2",
        ]
        server = ServerProcess(command=command, broker_url="").start()
        try:
            wait_for(
                lambda: server.log().count("looks like one of several (uvicorn --workers 2)") == 2,
                message="the warning from both workers",
            )
        finally:
            server.stop()

    def test_djangos_runserver_says_it_runs_no_task(self):
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="runserver-", suffix=".log", delete=False)  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: "streaming.W003" in Path(log.name).read_text(), message="the W003 warning")
            self.assertIn("runserver_stream", Path(log.name).read_text())
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()


# -- 4. the worker tier --------------------------------------------------------------------------


class TaskWorker:
    """``manage.py runtasks`` in a subprocess, on the test database."""

    def __init__(self, **streaming):
        streaming.setdefault("poll_interval", 0.05)
        streaming.setdefault("shutdown_grace", 0)
        self.streaming = streaming

    def start(self) -> "TaskWorker":
        self.log_file = tempfile.NamedTemporaryFile(prefix="runtasks-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "runtasks"],
            cwd=REPO,
            env=subprocess_env(**self.streaming),
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for(self._started, timeout=20, message="runtasks to start")
        return self

    def _started(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"runtasks exited with {self.proc.returncode}:\n{self.log()}")
        return "Streaming node started" in self.log()

    def log(self) -> str:
        return Path(self.log_file.name).read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()


class WorkerTierRefusalTests(TransactionTestCase):
    """With the in-memory broker, web + workers cannot work: refused, saying why."""

    def test_runtasks_needs_a_shared_broker(self):
        result = manage("runtasks", broker_url="")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("in-memory broker cannot carry their events", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_a_server_that_runs_no_task_needs_a_shared_broker(self):
        result = manage("runserver_stream", "--port", "1", broker_url="", run_tasks=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("RUN_TASKS is False", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


@unittest.skipUnless(is_shared(get_settings().BROKER_URL), NEEDS_SHARED)
class WorkerTierTests(TransactionTestCase):
    """runtasks runs the tasks; runserver_stream with RUN_TASKS=False serves their streams, live."""

    def test_a_task_runs_in_the_worker_and_streams_live_through_the_web_server(self):
        worker = TaskWorker().start()
        web = ServerProcess(run_tasks=False).start()
        try:
            self.assertIn("streams only", web.log())
            task = ScriptedTask.objects.create(steps=5, delay=0.4, status="created")
            at_first_event = []

            def on_event(event):
                if not at_first_event:
                    row = ScriptedTask.objects.get(pk=task.pk)
                    at_first_event.append((row.status, row.lease_owner))

            events = []
            reader = threading.Thread(
                target=lambda: events.extend(
                    read_stream(
                        f"{web.url}{task.get_stream_path()}",
                        headers={"Last-Event-ID": "0"},
                        on_event=on_event,
                    )
                )
            )
            reader.start()
            time.sleep(0.3)  # the client is connected before the task starts
            task.start()
            reader.join(30)
            self.assertEqual(
                [(e.id, e.event) for e in events], [(i, "step") for i in range(1, 6)] + [(6, "complete")]
            )
            # Live: the first event arrived while the task ran, in the worker.
            ((status, owner),) = at_first_event
            self.assertEqual(status, "running")
            self.assertIn(f":{worker.proc.pid}:", owner)
            self.assertEqual(status_of(task), "completed")
        finally:
            web.stop()
            worker.stop()

    def test_sigterm_hands_the_workers_tasks_back(self):
        worker = TaskWorker().start()
        try:
            task = ScriptedTask.objects.create(steps=200, delay=0.05)
            wait_for(lambda: status_of(task) == "running", message="the task to run in the worker")
            self.assertIn(f":{worker.proc.pid}:", task.lease_owner)
            worker.proc.send_signal(signal.SIGTERM)
            self.assertEqual(worker.proc.wait(15), 0)
            task.refresh_from_db()
            self.assertEqual((task.status, task.lease_owner), ("pending", None))
            self.assertIn("Streaming node stopped", worker.log())
        finally:
            worker.stop()

    def test_a_second_sigterm_ends_the_workers_grace_at_once(self):
        worker = TaskWorker(shutdown_grace=60).start()
        try:
            task = ScriptedTask.objects.create(steps=600, delay=0.1)
            wait_for(lambda: status_of(task) == "running", message="the task to run in the worker")
            worker.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "waiting up to" in worker.log(), message="the worker to say what it waits for")
            self.assertIsNone(worker.proc.poll(), "the first SIGTERM waits for the task")
            worker.proc.send_signal(signal.SIGTERM)
            self.assertEqual(worker.proc.wait(10), 0)
            task.refresh_from_db()
            self.assertEqual((task.status, task.lease_owner), ("pending", None))
        finally:
            worker.stop()


# -- 5. shutdown defaults -----------------------------------------------------------------------


class ShutdownGraceTests(TransactionTestCase):
    def test_the_grace_lets_a_running_task_finish(self):
        server = ServerProcess(shutdown_grace=30).start()
        try:
            task = ScriptedTask.objects.create(steps=10, delay=0.2)
            wait_for(lambda: status_of(task) == "running", message="the task to run")
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(20)
            self.assertIn("waiting up to", server.log())
            task.refresh_from_db()
            self.assertEqual((task.status, task.attempts), ("completed", 1))
        finally:
            server.stop()

    def test_a_second_ctrl_c_interrupts_the_tasks_at_once(self):
        server = ServerProcess(shutdown_grace=60).start()
        try:
            task = ScriptedTask.objects.create(steps=600, delay=0.1)
            wait_for(lambda: status_of(task) == "running", message="the task to run")
            server.proc.send_signal(signal.SIGINT)
            wait_for(lambda: "waiting up to" in server.log(), message="the server to say what it waits for")
            self.assertIn(str(task.pk), server.log().split("waiting up to", 1)[1].splitlines()[0])
            logged = len(ServerTestCase.logged(self, task))
            wait_for(lambda: len(ServerTestCase.logged(self, task)) > logged + 3, message="the task to go on")
            self.assertIsNone(server.proc.poll(), "the first Ctrl+C waits for the task")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            server.proc.wait(10)
            self.assertLess(time.monotonic() - started, 10)
            self.assertIn("Shutdown hurried", server.log())
            task.refresh_from_db()
            self.assertEqual((task.status, task.lease_owner), ("pending", None), "handed back by its policy")
        finally:
            server.stop()


# -- 6. --reload ----------------------------------------------------------------------------------


class ReloadTests(TransactionTestCase):
    def test_a_changed_file_restarts_the_server_and_its_tasks_go_on(self):
        watched = tempfile.mkdtemp(prefix="reload-")
        server = ServerProcess(
            command=[
                sys.executable, "manage.py", "runserver_stream", "--port", "{port}",
                "--reload", "--reload-dir", watched,
            ],
        ).start()  # fmt: skip
        try:
            first = wait_for(lambda: pids_started(server.log()), message="the first server process")[0]
            task = ScriptedTask.objects.create(steps=60, delay=0.1)
            wait_for(lambda: status_of(task) == "running", message="the task to run")
            Path(watched, "module.py").write_text("CHANGED = True\n")
            pids = wait_for(
                lambda: pids_started(server.log())[1:], timeout=20, message="a new server process"
            )
            self.assertNotEqual(pids[0], first)
            self.assertEqual(httpx.get(f"{server.url}/health", timeout=5).text, "OK")
            self.assertFalse(Path(f"/proc/{first}").exists(), "the old server process is gone, not a zombie")
            # The old process stopped its node (not killed): it handed the task back.
            self.assertIn(f"Handed {TaskKey.of(task)} back", server.log())
            events = read_stream(f"{server.url}{task.get_stream_path()}?history=all", timeout=30)
            self.assertIn("retry", [e.event for e in events], "rerun by the new process")
            self.assertEqual(events[-1].event, "complete")
            self.assertEqual(server.stop(), 0)
            self.assertFalse(Path(f"/proc/{pids[0]}").exists(), "no server process outlives the reloader")
        finally:
            server.stop()
