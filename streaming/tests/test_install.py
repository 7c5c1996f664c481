"""The "Done when" of "A library a Django project can adopt", end to end.

The wheel built from this repository is installed into a fresh virtualenv,
with every other dependency pinned to poetry.lock. A brand-new project
(``django-admin startproject``) adds ``streaming`` and an app with one task
model of its own, migrates, and serves it with ``runserver_stream``; a task
created from ``manage.py shell`` is streamed over HTTP to its end, and so is
a ``@task`` function of the project's, enqueued through Django's tasks
framework with ``TASKS`` naming our backend (the ``tasks`` extra brings the
backport on Django 5.2). Nothing of this repository's demo project or test
suite comes along.

Once per Django line: 5.2 on any supported Python, 6.x on Python 3.12+ (CI
runs the suite under both). It tests the package, not the database, so only
the SQLite pass of ``scripts/test.sh`` runs it.
"""

import importlib.metadata
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import unittest
import zipfile
from importlib.util import find_spec
from pathlib import Path

import httpx
from django.db import connection
from django.test import SimpleTestCase

import streaming

from .support import REPO, free_port, read_stream, wait_for

DISTRIBUTION = "django-streaming-coordinator"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# Where the demo project's and the suite's models live: none may reach a project.
FOREIGN_APP_LABELS = ("demo", "testapp", "otherapp")
FOREIGN_MODELS = ("exampletask", "continuetask")

MODELS_PY = """\
import asyncio

from django.db import models

from streaming import StreamTask


class Report(StreamTask):
    topic = models.CharField(max_length=100)
    steps = models.PositiveIntegerField(default=2)

    async def process(self):
        await self.send_event("started", {"topic": self.topic})
        for step in range(1, self.steps + 1):
            await asyncio.sleep(0.05)
            await self.send_event("progress", {"step": step, "of": self.steps})
        return {"topic": self.topic, "pages": 10 * self.steps}
"""

# A @task function of the project's own (README "Using Django's tasks framework").
TASKS_PY = """\
try:
    from django.tasks import task
except ImportError:  # Django 5.2: the backport (the [tasks] extra)
    from django_tasks import task

from streaming.taskbackend import send_event


@task
def summarize(topic):
    for step in (1, 2):
        send_event("progress", {"step": step, "of": 2})
    return {"topic": topic, "summary": "short"}
"""
ENQUEUE_TASK = (
    "from reports.tasks import summarize; "
    "result = summarize.enqueue('adoption'); "
    "print('RESULT', result.id, result.status); "
    "print('URL', result.stream_url(expires_in=120))"
)
ASGI_PY = """\
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
from streaming.asgi import get_asgi_application  # noqa: E402

application = get_asgi_application()
"""

# README "In your project", and its SQLite advice (so that `manage.py shell`
# can write while the server runs).
SETTINGS_TAIL = """

INSTALLED_APPS += ["streaming", "reports"]
ASGI_APPLICATION = "mysite.asgi.application"
TASKS = {"default": {"BACKEND": "streaming.taskbackend.StreamingTaskBackend"}}
DATABASES["default"]["OPTIONS"] = {
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    "transaction_mode": "IMMEDIATE",
    "timeout": 30,
}
"""

# README "Dashboard": the one line a project adds to its URLconf.
URLS_TAIL = """
from django.urls import include  # noqa: E402

urlpatterns += [path("streaming/", include("streaming.urls"))]
"""

# The Report class declares nothing about access, so its streams are
# protected: the project's own code mints a token (as a view would).
CREATE_TASK = (
    "from reports.models import Report; "
    "task = Report.objects.create(topic='adoption', steps=2); "
    "print('TASK', task.pk, task.status); "
    "print('URL', task.stream_url(expires_in=120))"
)

READ_WITH_CLIENT = """\
import json, sys
from streaming.client import stream_events
print(json.dumps([[event.id, event.type, event.data] for event in stream_events(sys.argv[1])]))
"""

INSTALLED_DISTRIBUTIONS = """\
import importlib.metadata, json
print(json.dumps({d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}))
"""

WHERE_FROM = """\
import json, streaming
from importlib.util import find_spec
print(json.dumps({
    "streaming": streaming.__file__,
    "streaming.tests": find_spec("streaming.tests") is not None,
    "demo": find_spec("demo") is not None,
    "config": find_spec("config") is not None,
}))
"""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, list[dict]]:
    """poetry.lock's packages by name (a name may have one entry per marker)."""
    with (REPO / "poetry.lock").open("rb") as file:
        lock = tomllib.load(file)
    packages: dict[str, list[dict]] = {}
    for package in lock["package"]:
        packages.setdefault(normalize(package["name"]), []).append(package)
    return packages


def constraints(packages: dict[str, list[dict]]) -> str:
    """A pip constraints file: name==version of every locked package but Django."""
    lines = []
    for name, entries in sorted(packages.items()):
        if name == "django":  # each test chooses its Django
            continue
        for entry in entries:
            line = f"{name}=={entry['version']}"
            marker = entry.get("markers")
            if len(entries) > 1 and marker:  # one version per environment
                if isinstance(marker, dict):
                    marker = " or ".join(f"({value})" for value in marker.values())
                line += f"; {marker}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def pip_has_python_option() -> bool:
    """Whether this interpreter's pip can install into another environment (``--python``, pip 22.3+)."""
    if find_spec("pip") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("pip").split(".")[:2])
    return (major, minor) >= (22, 3)


def tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else f"[... {len(text) - limit} characters ...]\n{text[-limit:]}"


def build_wheel(out: Path) -> tuple[Path, str]:
    """The wheel of this repository, as poetry builds it (pip's build of it if poetry is missing)."""
    poetry = shutil.which("poetry") or str(Path.home() / ".local/bin/poetry")
    if os.access(poetry, os.X_OK):
        command = [poetry, "build", "--format", "wheel", "--output", str(out)]
    else:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(REPO)]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    log = f"$ {' '.join(command)}\nexit {result.returncode}\n{result.stdout}{result.stderr}"
    wheels = list(out.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise AssertionError(f"building the wheel failed:\n{log}")
    return wheels[0], log


@unittest.skipUnless(
    connection.vendor == "sqlite",
    "installs the package into a new project on SQLite; runs once per Python, in the suite's "
    f"SQLite pass (scripts/test.sh), not again in this {connection.vendor} pass",
)
class InstallTests(SimpleTestCase):
    """The wheel in a fresh virtualenv serves a new project's own task."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.build_dir = Path(tempfile.mkdtemp(prefix="streaming-wheel-"))
        cls.addClassCleanup(shutil.rmtree, cls.build_dir, ignore_errors=True)
        cls.locked = locked()
        cls.constraints = cls.build_dir / "constraints.txt"
        cls.constraints.write_text(constraints(cls.locked))
        cls.wheel, cls.build_log = build_wheel(cls.build_dir / "dist")

    def test_the_wheel_carries_the_library_and_nothing_else(self):
        with zipfile.ZipFile(self.wheel) as wheel:
            names = wheel.namelist()
            metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        context = f"{self.wheel.name}:\n" + "\n".join(names)
        self.assertEqual([n for n in names if n.startswith("streaming/tests/")], [], context)
        # Nothing but the library: no demo/, config/, stream_client.py.
        top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
        self.assertEqual(top, {"streaming"}, context)
        for required in (
            "streaming/__init__.py",
            "streaming/migrations/0001_initial.py",
            "streaming/migrations/0002_enqueuedtask.py",  # the tasks backend's table
            "streaming/taskbackend/backend.py",
            "streaming/py.typed",
            "streaming/static/streaming/admin-tail.js",  # the admin's live tail
            "streaming/static/streaming/streaming.js",  # the JavaScript client
            "streaming/static/streaming/dashboard.js",  # the dashboard's pages
            "streaming/static/streaming/dashboard.css",
            "streaming/templates/streaming/dashboard/list.html",
            "streaming/urls.py",
        ):
            self.assertIn(required, names, context)
        self.assertIn(f"Version: {streaming.__version__}\n", metadata)
        for extra in ("client", "postgres", "redis", "tasks"):
            self.assertIn(f"Provides-Extra: {extra}\n", metadata)

    def test_a_new_project_on_django_5_2(self):
        self.adopt(self.locked_django("5.2."))

    @unittest.skipIf(
        sys.version_info < (3, 12),
        f"Django 6 needs Python >= 3.12 and this is Python {PYTHON}: "
        "the suite's Python 3.12 run (.venv-py312) covers the Django 6.x line",
    )
    def test_a_new_project_on_django_6(self):
        self.adopt(self.locked_django("6."))

    def locked_django(self, prefix: str) -> str:
        versions = [
            entry["version"] for entry in self.locked["django"] if entry["version"].startswith(prefix)
        ]
        self.assertEqual(len(versions), 1, f"poetry.lock should pin one Django {prefix}x, pins {versions}")
        return versions[0]

    # -- the scenario ----------------------------------------------------------------

    def adopt(self, django_version: str) -> None:
        started = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="streaming-adopt-"))
        self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)
        self.transcript = [self.build_log]
        self.server: subprocess.Popen | None = None
        self.server_log = self.work / "runserver_stream.log"
        self.phases: dict[str, float] = {}
        try:
            self.scenario(django_version)
        except Exception as exc:  # a failure, or an error: either way, with what led to it
            message = str(exc) if isinstance(exc, AssertionError) else repr(exc)
            raise self.failureException(f"{message}\n\n{self.context()}") from exc
        finally:
            self.stop_server(check=False)
        phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items())
        sys.stderr.write(
            f"\n[test_install] Django {django_version} on Python {PYTHON}: "
            f"{time.monotonic() - started:.1f} s ({phases})\n"
        )

    def scenario(self, django_version: str) -> None:
        venv = self.work / "venv"
        self.python = venv / "bin" / "python"
        self.env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("DJANGO_", "STREAMING_", "PYTHON", "VIRTUAL_ENV", "DATABASE_URL"))
        }
        self.env["PATH"] = f"{venv / 'bin'}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.phase_started = time.monotonic()

        # 1. A fresh virtualenv with the wheel, the chosen Django, and the locked rest.
        if pip_has_python_option():  # this Python's pip installs there: no ensurepip (6 s)
            self.call([sys.executable, "-m", "venv", "--without-pip", venv])
            pip = [sys.executable, "-m", "pip", "--python", self.python]
        else:
            self.call([sys.executable, "-m", "venv", venv])
            pip = [self.python, "-m", "pip"]
        requirement = f"{self.wheel}[client,tasks]"
        pinned = ["--constraint", self.constraints, f"django=={django_version}"]
        self.call([*pip, "install", "--no-compile", requirement, *pinned], timeout=600)
        self.call([*pip, "check"])
        installed = json.loads(self.call([self.python, "-c", INSTALLED_DISTRIBUTIONS]).stdout)
        installed = {normalize(name): version for name, version in installed.items()}
        self.assertEqual(installed.pop("django", None), django_version, installed)
        self.assertEqual(installed.pop(DISTRIBUTION, None), streaming.__version__, installed)
        for name in ("httpx", "httpx-sse", "uvicorn", "httptools"):
            self.assertIn(name, installed)
        unlocked = {
            name: version
            for name, version in installed.items()
            if name not in ("pip", "setuptools")  # the venv's own, with ensurepip
            and version not in {entry["version"] for entry in self.locked.get(name, [])}
        }
        self.assertEqual(unlocked, {}, "installed, but not at poetry.lock's version")
        # The distributed mode's extras resolve, to the locked versions.
        report = self.work / "extras.json"
        extras = f"{self.wheel}[client,redis,postgres]"
        self.call([*pip, "install", "--dry-run", "--report", report, extras, *pinned], timeout=600)
        would_install = {
            normalize(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
        for name in ("redis", "psycopg"):
            self.assertEqual(would_install.get(name), self.locked[name][0]["version"], would_install)
        self.phase_done("install")

        # 2. A brand-new project and app, with one task model, set up as the README says.
        self.call([venv / "bin" / "django-admin", "startproject", "mysite"], cwd=self.work)
        self.project = self.work / "mysite"
        self.manage("startapp", "reports")
        (self.project / "reports" / "models.py").write_text(MODELS_PY)
        (self.project / "reports" / "tasks.py").write_text(TASKS_PY)
        (self.project / "mysite" / "asgi.py").write_text(ASGI_PY)
        with (self.project / "mysite" / "settings.py").open("a") as settings:
            settings.write(SETTINGS_TAIL)
        with (self.project / "mysite" / "urls.py").open("a") as urls:
            urls.write(URLS_TAIL)
        self.manage("makemigrations", "reports")
        self.assertTrue((self.project / "reports" / "migrations" / "0001_initial.py").exists())
        migrated = self.manage("migrate").stdout
        self.assertIn("Applying streaming.0001_initial... OK", migrated)
        self.assertIn("Applying streaming.0002_enqueuedtask... OK", migrated)
        self.assertIn("Applying reports.0001_initial... OK", migrated)

        # The library comes from the wheel, alone.
        where = json.loads(self.call([self.python, "-c", WHERE_FROM], cwd=self.project).stdout)
        self.assertTrue(Path(where["streaming"]).is_relative_to(venv), where)
        self.assertEqual(
            (where["streaming.tests"], where["demo"], where["config"]), (False, False, False), where
        )
        commands = self.manage("help").stdout
        self.assertIn("runserver_stream", commands)
        self.assertNotIn("create_task", commands)
        self.phase_done("project")

        # 3. The server, a task, its stream.
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.start_server(port)
        created = self.manage("shell", "-c", CREATE_TASK).stdout
        match = re.search(r"^TASK (\d+) pending$", created, re.MULTILINE)
        self.assertIsNotNone(match, f"no 'TASK <id> pending' in: {created!r}")
        pk = int(match[1])
        signed = re.search(r"^URL (\S+)$", created, re.MULTILINE)
        self.assertIsNotNone(signed, f"no 'URL <stream url>' in: {created!r}")
        # Secure by default: no credentials, no stream; the minted URL opens it.
        refused = httpx.get(f"{url}/stream/Report/{pk}", timeout=10)
        self.assertEqual(refused.status_code, 403, refused.text)
        self.assertTrue(signed[1].startswith(f"/stream/Report/{pk}?token="), signed[1])
        stream = f"{url}{signed[1]}&history=all"

        events = read_stream(stream, timeout=30)
        self.assertEqual(
            [(e.id, e.event) for e in events],
            [(1, "started"), (2, "progress"), (3, "progress"), (4, "complete")],
        )
        own = [{k: v for k, v in e.data.items() if not k.startswith("_")} for e in events]
        self.assertEqual(
            own,
            [
                {"topic": "adoption"},
                {"step": 1, "of": 2},
                {"step": 2, "of": 2},
                {"topic": "adoption", "pages": 20},
            ],
        )
        self.assertEqual({(e.data["_task_id"], e.data["_model"]) for e in events}, {(pk, "Report")})

        # The same stream through the installed package's client (the [client] extra).
        read = json.loads(self.call([self.python, "-c", READ_WITH_CLIENT, stream], timeout=60).stdout)
        self.assertEqual(
            [(id_, type_) for id_, type_, _ in read],
            [("1", "started"), ("2", "progress"), ("3", "progress"), ("4", "complete")],
        )
        self.assertEqual(read[-1][2], events[-1].data)

        status = httpx.get(stream, headers={"Accept": "application/json"}, timeout=10)
        self.assertEqual(status.status_code, 200, status.text)
        body = status.json()
        self.assertEqual(
            {
                k: body[k]
                for k in ("id", "model", "status", "final_value", "error", "attempts", "last_event_id")
            },
            {
                "id": pk,
                "model": "Report",
                "status": "completed",
                "final_value": {"topic": "adoption", "pages": 20},
                "error": None,
                "attempts": 1,
                "last_event_id": 4,
            },
        )

        # Django's tasks framework, by the one setting: a @task runs on the server and streams.
        enqueued = self.manage("shell", "-c", ENQUEUE_TASK).stdout
        match = re.search(r"^RESULT (\d+) READY$", enqueued, re.MULTILINE)
        self.assertIsNotNone(match, f"no 'RESULT <id> READY' in: {enqueued!r}")
        signed = re.search(r"^URL (\S+)$", enqueued, re.MULTILINE)
        self.assertIsNotNone(signed, f"no 'URL <stream url>' in: {enqueued!r}")
        events = read_stream(f"{url}{signed[1]}&history=all", timeout=30)
        self.assertEqual([e.event for e in events], ["progress", "progress", "complete"])
        self.assertEqual(events[-1].data["summary"], "short")
        fetched = self.manage(
            "shell",
            "-c",
            f"from reports.tasks import summarize; r = summarize.get_result('{match[1]}'); "
            "print('STATUS', r.status, r.return_value['topic'])",
        ).stdout
        self.assertIn("STATUS SUCCESSFUL adoption", fetched)

        # The dashboard, mounted with one line (README "Dashboard"): staff only.
        dashboard = httpx.get(f"{url}/streaming/", timeout=10)
        self.assertEqual(dashboard.status_code, 302, dashboard.text)
        self.assertEqual(dashboard.headers["location"], "/accounts/login/?next=/streaming/")

        self.stop_server(check=True)

        # 4. The project's database: its own tables and the library's, nothing else's.
        with sqlite3.connect(self.project / "db.sqlite3") as db:
            tables = sorted(
                name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            )
        self.assertIn("reports_report", tables)
        self.assertIn("streaming_taskevent", tables)
        self.assertIn("streaming_enqueuedtask", tables)
        foreign = [
            name
            for name in tables
            if name.startswith(tuple(f"{label}_" for label in FOREIGN_APP_LABELS))
            or name.endswith(FOREIGN_MODELS)
        ]
        self.assertEqual(foreign, [], f"tables: {tables}")
        self.phase_done("serve")

    # -- helpers ---------------------------------------------------------------------

    def call(self, command, *, cwd=None, timeout=120) -> subprocess.CompletedProcess:
        """Run a command to its end; record it, and fail on a non-zero exit."""
        command = [str(arg) for arg in command]
        started = time.monotonic()
        shown = " ".join(command)
        try:
            result = subprocess.run(
                command,
                cwd=cwd or self.work,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            out, err = (
                (data.decode(errors="replace") if isinstance(data, bytes) else data or "")
                for data in (exc.stdout, exc.stderr)
            )
            self.transcript.append(
                f"$ {shown}\nkilled after {timeout} s\n--- stdout\n{tail(out)}\n--- stderr\n{tail(err)}"
            )
            self.fail(f"still running after {timeout} s: {shown[:300]}")
        self.transcript.append(
            f"$ {shown}\n"
            f"exit {result.returncode} after {time.monotonic() - started:.1f} s\n"
            f"--- stdout\n{tail(result.stdout)}\n--- stderr\n{tail(result.stderr)}"
        )
        self.assertEqual(result.returncode, 0, f"exit {result.returncode}: {shown[:300]}")
        return result

    def manage(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return self.call([self.python, "manage.py", *args], cwd=self.project, timeout=timeout)

    def start_server(self, port: int) -> None:
        with self.server_log.open("wb") as log:
            self.server = subprocess.Popen(
                [str(self.python), "manage.py", "runserver_stream", "--port", str(port)],
                cwd=self.project,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def healthy() -> bool:
            if self.server.poll() is not None:
                raise AssertionError(f"runserver_stream exited with {self.server.returncode} before /health")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).text == "OK"
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=30, message="runserver_stream to answer /health with OK")

    def stop_server(self, *, check: bool) -> None:
        """SIGTERM and wait; with ``check``, it must have shut down gracefully."""
        server, self.server = self.server, None
        if server is None:
            return
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
                if check:
                    self.fail("runserver_stream did not stop within 30 s of SIGTERM")
        if check:
            # uvicorn ends a graceful shutdown by re-raising the signal it caught.
            self.assertIn(server.returncode, (0, -signal.SIGTERM), "runserver_stream's exit status")
            self.assertIn("Finished server process", self.server_log.read_text(), "no graceful shutdown")

    def phase_done(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = now - self.phase_started
        self.phase_started = now

    def context(self) -> str:
        log = self.server_log.read_text(errors="replace") if self.server_log.exists() else "(not started)"
        commands = "\n\n".join(self.transcript)
        return f"=== commands\n{commands}\n\n=== runserver_stream's log\n{tail(log, 8000)}"
