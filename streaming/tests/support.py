"""Test support: a real runserver_stream subprocess, SSE read over HTTP, in-process helpers."""

import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
from django.db import connection

from streaming import conf

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"complete", "error", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.02, message="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def database_url() -> str:
    """The URL of the database this test process uses (the test database)."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    if connection.vendor == "postgresql":
        auth = quote(s.get("USER") or "")
        if s.get("PASSWORD"):
            auth += ":" + quote(s["PASSWORD"])
        host = s.get("HOST") or "127.0.0.1"
        port = s.get("PORT") or 5432
        return f"postgres://{auth}@{host}:{port}/{s['NAME']}"
    raise NotImplementedError(connection.vendor)


def subprocess_env(**streaming) -> dict:
    """Environment for a manage.py subprocess on the test database."""
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url()
    env["PYTHONUNBUFFERED"] = "1"
    env["STREAMING_TEST_APPS"] = "1"
    for name, value in streaming.items():
        env[f"STREAMING_{name.upper()}"] = str(value)
    return env


def manage(*args, timeout=60, **streaming) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=subprocess_env(**streaming),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class ServerProcess:
    """``manage.py runserver_stream`` on a free port, on the test database."""

    def __init__(self, *, port=None, socket_path=None, workers=1, command=None, env=None, **streaming):
        """``command``: run this instead (``{port}`` is filled in), e.g. another ASGI server;
        ``env``: more environment variables (e.g. DJANGO_SETTINGS_MODULE)."""
        streaming.setdefault("poll_interval", 0.05)
        streaming.setdefault("shutdown_grace", 0)  # the default (25 s) would slow every stop down
        self.env = env or {}
        self.port_given = port is not None
        self.port = port or free_port()
        self.socket_path = socket_path
        self.workers = workers
        self.streaming = streaming
        self.command = command
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=60.0) -> "ServerProcess":
        """Start it and wait until /health answers. At the first start, a port of
        ours taken between ``free_port()`` and the bind (by any socket on this
        busy machine) is swapped for another; a port the test gave, or one a
        restart must keep, is not."""
        may_move = not self.port_given and self.proc is None
        for attempt in range(3):
            try:
                return self._start(timeout)
            except AssertionError:
                if not may_move or attempt == 2 or "address already in use" not in self.log():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "ServerProcess":
        import tempfile

        log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - outlives this call
            prefix="stream-server-", suffix=".log", delete=False
        )
        self.log_path = log.name
        where = ["--socket", self.socket_path] if self.socket_path else ["--port", str(self.port)]
        command = [sys.executable, "manage.py", "runserver_stream", *where, "--workers", str(self.workers)]
        if self.command:
            command = [arg.format(port=self.port) for arg in self.command]
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env={**subprocess_env(**self.streaming), **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            wait_for(self._healthy, timeout=timeout, message=f"server on {where} to be healthy")
        except BaseException:
            # Never leave a server behind: a stray one would go on claiming the
            # test database's tasks under the next tests.
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            raise
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            if self.socket_path:
                transport = httpx.HTTPTransport(uds=self.socket_path)
                with httpx.Client(transport=transport) as client:
                    return client.get("http://localhost/health", timeout=1).text == "OK"
            return httpx.get(f"{self.url}/health", timeout=1).text == "OK"
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return Path(self.log_path).read_text() if self.log_path else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout=15.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else 0


@dataclass
class SSE:
    id: int | None
    event: str
    data: dict


def parse_sse(text: str) -> list[SSE]:
    """Parse a complete SSE body (blank-line separated messages)."""
    messages = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if "data" in fields:
            messages.append(
                SSE(
                    int(fields["id"][0]) if "id" in fields else None,
                    fields.get("event", ["message"])[0],
                    json.loads("\n".join(fields["data"])),
                )
            )
    return messages


def read_stream(url, *, headers=None, limit=None, timeout=30.0, on_event=None) -> list[SSE]:
    """Read events until a terminal one (or ``limit`` events, or the end)."""
    events: list[SSE] = []
    buffer = ""
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=httpx.Timeout(timeout)) as client,
        client.stream("GET", url, headers=headers or {}) as response,
    ):
        assert response.status_code == 200, f"{response.status_code}: {response.read()!r}"
        for text in response.iter_text():
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for message in parse_sse(block + "\n\n"):
                    events.append(message)
                    if on_event:
                        on_event(message)
                    if message.event in TERMINAL or (limit and len(events) >= limit):
                        return events
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {url} did not end within {timeout}s: {events}")
    return events


def node_settings(**overrides):
    values = {
        "BROKER_URL": None,
        "RUN_TASKS": True,
        "POLL_INTERVAL": 0.05,
        "LEASE_SECONDS": 3.0,
        "EVENT_FLUSH_INTERVAL": 0.02,
        "SHUTDOWN_GRACE": 0.0,
        "WAIT_POLL_INTERVAL": 0.05,
    }
    values.update(overrides)
    return dataclasses.replace(conf.get_settings(), **values)


async def eventually(check, *, timeout=5.0, interval=0.02, message="condition"):
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def serving(django_app=None, *, log_level="warning", **settings):
    """runserver_stream's uvicorn set-up, in this process: (the StreamingApp, its port).

    ``settings``: the node's STREAMING settings (``MAX_STREAMS=3``); ``django_app``:
    what serves the other paths (Django's ASGIHandler, say)."""
    import uvicorn

    from streaming.node import Node
    from streaming.server.serve import make_config
    from streaming.web.app import StreamingApp

    app = StreamingApp(django_app, node_factory=lambda: Node(node_settings(**settings)))
    config = make_config(app, host="127.0.0.1", port=0, uds=None, log_level=log_level)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    serve = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or serve.done(), message="the server to start")
        yield app, sock.getsockname()[1]
    finally:
        server.should_exit = True
        await app.shutdown()
        await asyncio.wait_for(serve, 10)
        sock.close()


async def raw_request(port: int, path: str, headers: str = ""):
    """A GET over a raw socket: the response head (text), and the open connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head.decode("latin-1"), reader, writer
