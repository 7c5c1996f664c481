"""Hostile and broken clients against a real server (issue 9): what each costs it, what it answers.

    .venv/bin/python bench/hostile.py --all
    .venv/bin/python bench/hostile.py --idle --slowloris [--tree ../other-checkout] \\
        [--env STREAMING_HEADER_TIMEOUT=5] [--server-nofile 20000]

Each scenario starts a fresh ``runserver_stream`` (one process, SQLite in a
bench directory of its own, the test app's ScriptedTask) under a raised
file-descriptor limit (``--server-nofile``, 20,000 as in the issue), runs the
attack from a separate process (raw asyncio sockets: ``hostile.py _worker``)
while this process probes /health every 100 ms and samples the server's RSS
(/proc/<pid>/status VmRSS) and open fds (/proc/<pid>/fd), then prints a
table. Scenarios:

--idle        N sockets that connect and send nothing (default 21,000: past
              the server's 20,000 fds, as in the issue); a real stream opened
              during the attack must get its events.
--slowloris   N sockets sending one header byte every --drip seconds: how
              many are still open after 1x and 2x the header timeout.
--bigheader   one request with a --header-mb (200) MB header, sent as fast as
              possible: the answer, and the server's RSS before/peak/after.
--streams     streams of one task from one client address until refused (the
              per-client limit), then from 100 more addresses until refused
              (the total / connection limit): the count, the status line and
              Retry-After; then /health and a stream of another client.
--history     a finished task with --history-events (100,000) events in its
              log; N clients open ?history=all and never read: RSS before,
              peak, after the server cut them (CLIENT_SEND_TIMEOUT, 5 s here
              unless --env sets it) and after they close.
--websocket   WebSocket upgrades to /admin/, / and /stream/...: the status
              line, and whether the server log holds a traceback.

--tree PATH runs the server (and this script's ORM work) from another
checkout, for before/after figures in one session; --env KEY=VALUE
(repeatable) sets the server's environment (any STREAMING_<NAME> setting).
The bench directory is $HOSTILE_BENCH_DIR or <tmp>/streaming-bench-hostile;
server logs stay there. Results also go to bench/results/hostile-*.json.
"""

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections import Counter
from functools import partial
from pathlib import Path

SCRIPT = str(Path(__file__).resolve())
HERE = Path(SCRIPT).parent
REPO = HERE.parent
PYTHON = sys.executable
BENCH_DIR = Path(
    os.environ.get("HOSTILE_BENCH_DIR") or Path(tempfile.gettempdir()) / "streaming-bench-hostile"
)
HOST = "127.0.0.1"
MB = 1024 * 1024
# Sockets per attack process: the hard fd limit here is 20,000 and cannot be raised.
PER_PROCESS = 15_000


# -- shared helpers (soak.py imports these) ---------------------------------------------------


def set_nofile(limit: int) -> int:
    """Set this process's fd limit to ``limit``, or to the hard limit if that is lower
    (raising the hard limit needs CAP_SYS_RESOURCE; tried, else left)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and limit > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):
            limit = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    return limit


def hard_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def fmt_ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f}"


def fmt_mb(kb) -> str:
    return "-" if kb is None else f"{kb / 1024:,.0f}"


def error_name(exc: BaseException) -> str:
    return type(exc).__name__


def setup_django(tree: Path, name: str) -> str:
    """A fresh SQLite bench database ``name`` in BENCH_DIR, migrated with ``tree``'s code;
    this process's Django then runs on ``tree`` (its models make the bench rows)."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    for path in BENCH_DIR.glob(f"{name}.sqlite3*"):
        path.unlink()
    url = f"sqlite:///{BENCH_DIR / f'{name}.sqlite3'}"
    for key in [k for k in os.environ if k.startswith("STREAMING_")]:
        del os.environ[key]
    os.environ.pop("DJANGO_DEBUG", None)
    os.environ.update(DATABASE_URL=url, STREAMING_TEST_APPS="1", DJANGO_SETTINGS_MODULE="config.settings")
    sys.path.insert(0, str(tree))
    import django

    django.setup()
    import streaming

    if Path(streaming.__file__).resolve().parent.parent != tree.resolve():
        raise RuntimeError(f"streaming imported from {streaming.__file__}, not from {tree}")
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return url


def parse_env(pairs) -> dict[str, str]:
    env = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def tree_commit(tree: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip()[:90] + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


class ServerProc:
    """``manage.py runserver_stream`` of ``tree`` as a subprocess (its own session),
    up once /health answers."""

    def __init__(self, tree: Path, database_url: str, *, env=None, nofile=20000, name="server", workers=1):
        self.tree = Path(tree)
        self.port = free_port()
        self.nofile = nofile
        full = {k: v for k, v in os.environ.items() if not k.startswith("STREAMING_")}
        full.pop("DJANGO_DEBUG", None)
        full.update(
            DATABASE_URL=database_url,
            STREAMING_TEST_APPS="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(self.tree),
            STREAMING_SHUTDOWN_GRACE="0",  # stop at once, whatever still runs
        )
        full.update(env or {})
        self.env = full
        self.settings_env = {k: v for k, v in sorted(full.items()) if k.startswith("STREAMING_")}
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = BENCH_DIR / f"{name}-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        code = subprocess.run(
            [PYTHON, "-c", "import streaming; print(streaming.__file__)"],
            cwd=self.tree, env=full, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not code.startswith(str(self.tree)):
            raise RuntimeError(f"the server would import streaming from {code}, not from {self.tree}")
        self.code = code
        self.proc = subprocess.Popen(
            [PYTHON, "manage.py", "runserver_stream", "--port", str(self.port), "--workers", str(workers),
             "--log-level", "warning"],
            cwd=self.tree, env=full, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=partial(set_nofile, nofile), start_new_session=True,
        )  # fmt: skip
        try:
            self._wait_healthy(30)
        except BaseException:
            self.stop()
            raise
        time.sleep(0.5)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if get_sync(self.port, "/health", timeout=1).startswith(b"HTTP/1.1 200"):
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"server did not start (see {self.log_path})")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    todo += [int(p) for p in children.read_text().split()]
        return pids

    def rss_kb(self) -> int | None:
        total = 0
        try:
            for pid in self.pids():
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            return None
        return total

    def fds(self) -> int | None:
        try:
            return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.pids())
        except OSError:
            return None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def get_sync(port: int, path: str, timeout: float = 2.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def request_bytes(path: str, headers=()) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_head(head: bytes) -> tuple[str, int | None, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0]
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status_line, status, headers


async def fetch(port, path, *, headers=(), timeout=2.0, source=None, raw: bytes | None = None) -> dict:
    """One request on a fresh connection: status, headers, body (by content-length) and latency."""
    t0 = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                HOST, port, local_addr=(source, 0) if source else None, limit=1 << 20
            )
            writer.write(raw or request_bytes(path, [("Connection", "close"), *headers]))
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, status, hdrs = parse_head(head)
            length = int(hdrs.get("content-length", "0") or 0)
            body = await reader.readexactly(length) if length else b""
        return {
            "status": status, "status_line": status_line, "headers": hdrs, "body": body,
            "latency": time.perf_counter() - t0, "error": None,
        }  # fmt: skip
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return {"status": None, "status_line": None, "headers": {}, "body": b"",
                "latency": time.perf_counter() - t0, "error": error_name(exc)}  # fmt: skip
    finally:
        if writer is not None:
            writer.close()


async def watch_stream(port, path, *, expect, timeout, start=None, source=None, headers=()) -> dict:
    """Open a stream, call ``start()`` (sync, in a thread) once its head arrived, count events."""
    t0 = time.perf_counter()
    result = {"status_line": None, "events": 0, "seconds": None, "complete": False, "error": None}
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                HOST, port, local_addr=(source, 0) if source else None
            )
            writer.write(request_bytes(path, [("Accept", "text/event-stream"), *headers]))
            head = await reader.readuntil(b"\r\n\r\n")
            result["status_line"] = parse_head(head)[0]
            if start is not None:
                await asyncio.to_thread(start)
            body = b"\n"
            while result["events"] < expect:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                body += chunk
                result["events"] = body.count(b"\nid: ")
            result["complete"] = result["events"] >= expect
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        result["error"] = error_name(exc)
    finally:
        result["seconds"] = time.perf_counter() - t0
        if writer is not None:
            writer.close()
    return result


class Prober:
    """GET /health every ``interval`` s, each on a new connection, whatever the previous one does."""

    def __init__(self, port: int, interval: float = 0.1, timeout: float = 2.0):
        self.port, self.interval, self.timeout = port, interval, timeout
        self.results: list[tuple[float, bool, float, str]] = []  # (when, ok, latency, what)
        self._pending: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> "Prober":
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            probe = asyncio.create_task(self._probe(time.monotonic()))
            self._pending.add(probe)
            probe.add_done_callback(self._pending.discard)
            await asyncio.sleep(self.interval)

    async def _probe(self, when: float) -> None:
        answer = await fetch(self.port, "/health", timeout=self.timeout)
        ok = answer["status"] == 200 and answer["body"] == b"OK"
        what = "ok" if ok else (answer["error"] or answer["status_line"] or "?")
        self.results.append((when, ok, answer["latency"], what))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*list(self._pending), return_exceptions=True)

    def summary(self, since: float | None = None, until: float | None = None) -> dict:
        rows = [
            r for r in self.results if (since is None or r[0] >= since) and (until is None or r[0] < until)
        ]
        latencies = [r[2] for r in rows if r[1]]
        return {
            "probes": len(rows),
            "ok": len(latencies),
            "failed": len(rows) - len(latencies),
            "failures": dict(Counter(r[3] for r in rows if not r[1]).most_common(4)),
            "p50_s": percentile(latencies, 0.5),
            "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies) if latencies else None,
        }


def probe_text(s: dict) -> str:
    text = f"{s['ok']}/{s['probes']} ok, p50 {fmt_ms(s['p50_s'])} ms, p99 {fmt_ms(s['p99_s'])} ms"
    if s["failures"]:
        text += "; failed: " + ", ".join(f"{k} x{v}" for k, v in s["failures"].items())
    return text


class Sampler:
    """The server's RSS and fds every ``interval`` s."""

    def __init__(self, server: ServerProc, interval: float = 0.2):
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, int | None, int | None]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> "Sampler":
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.server.rss_kb(), self.server.fds()))
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def peak(self, since=None, until=None) -> tuple[int | None, int | None]:
        rows = [
            s for s in self.samples if (since is None or s[0] >= since) and (until is None or s[0] <= until)
        ]
        rss = [s[1] for s in rows if s[1] is not None]
        fds = [s[2] for s in rows if s[2] is not None]
        return (max(rss) if rss else None, max(fds) if fds else None)


class Worker:
    """This script as an attack process (``hostile.py _worker SCENARIO PARAMS``):
    JSON lines out, commands in."""

    def __init__(self, scenario: str, params: dict, script: str = SCRIPT):
        self.scenario, self.params, self.script = scenario, params, script
        self.proc: asyncio.subprocess.Process | None = None
        self.messages: list[dict] = []

    async def start(self) -> "Worker":
        self.proc = await asyncio.create_subprocess_exec(
            PYTHON, self.script, "_worker", self.scenario, json.dumps(self.params),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=16 * MB, cwd=HERE,
        )  # fmt: skip
        return self

    async def expect(self, ev: str, timeout: float | None = None) -> dict:
        """The next message ``ev`` (progress messages on the way are kept in .messages)."""
        assert self.proc is not None and self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker {self.scenario} ended without {ev!r}")
                message = json.loads(line)
                self.messages.append(message)
                if message["ev"] == ev:
                    return message
                if message["ev"] == "error":
                    raise RuntimeError(f"worker {self.scenario}: {message['error']}")

    def send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    async def finish(self) -> None:
        if self.proc is None:
            return
        try:
            async with asyncio.timeout(30):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Shards:
    """One attack spread over processes of at most ``per_process`` sockets each (each process
    has at most the hard fd limit; the attack may need more than one process can hold)."""

    def __init__(self, scenario: str, params: dict, *, per_process: int):
        n = params["n"]
        count = max(1, -(-n // per_process))
        self.workers = [
            Worker(scenario, {**params, "n": n // count + (i < n % count), "nofile": per_process + 1000})
            for i in range(count)
        ]

    async def start(self) -> "Shards":
        for worker in self.workers:
            await worker.start()
        return self

    async def expect(self, ev: str, timeout: float | None = None) -> dict:
        return merge(await asyncio.gather(*(w.expect(ev, timeout) for w in self.workers)))

    async def finish(self) -> None:
        await asyncio.gather(*(w.finish() for w in self.workers))


def finished_task(events: int, payload: int):
    """A completed ScriptedTask with ``events`` events in its log (the last one ``complete``),
    its rows inserted in bulk rather than run."""
    from django.db import transaction
    from django.utils import timezone

    from streaming.events import build_payload
    from streaming.keys import TaskKey
    from streaming.models import TaskEvent
    from streaming.tests.testapp.models import ScriptedTask

    now = timezone.now()
    task = ScriptedTask.objects.create(
        steps=events - 1, payload_size=payload, status="completed", attempts=1, started_at=now,
        completed_at=now, seq_reserved=events,
    )  # fmt: skip
    key = TaskKey.of(task)
    filler = "x" * payload
    name = ScriptedTask.stream_name()

    def row(seq):
        last = seq == events
        data = {} if last else {"step": seq, "attempt": 1, "filler": filler}
        return TaskEvent(
            task_type=key.label, task_id=key.pk, seq=seq, type="complete" if last else "step",
            payload=build_payload(data, task_id=task.pk, model_name=name),
        )  # fmt: skip

    with transaction.atomic():
        for start in range(1, events + 1, 5000):
            TaskEvent.objects.bulk_create([row(s) for s in range(start, min(events, start + 4999) + 1)])
    return task


def table(title: str, rows: list[tuple[str, object]]) -> str:
    lines = [f"### {title}", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


# -- the attack process ---------------------------------------------------------------------------


def emit(ev: str, **data) -> None:
    print(json.dumps({"ev": ev, **data}), flush=True)


async def read_command() -> str:
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


class Conn(asyncio.Protocol):
    """A client socket that records when it opened, what it got first and when the server closed it."""

    def __init__(self):
        self.transport = None
        self.t_open = None
        self.t_closed = None
        self.first = b""
        self.received = 0
        # Made here: an answer may come before the request is written (a server at its cap).
        self.head_done: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.t_open = time.monotonic()

    def data_received(self, data):
        self.received += len(data)
        if len(self.first) < 512:
            self.first += data[: 512 - len(self.first)]
        if not self.head_done.done() and b"\r\n\r\n" in self.first:
            self.head_done.set_result(True)

    def eof_received(self):
        return False  # close

    def connection_lost(self, exc):
        self.t_closed = time.monotonic()
        if not self.head_done.done():
            self.head_done.set_result(False)

    @property
    def status_line(self) -> str:
        return self.first.split(b"\r\n", 1)[0].decode("latin-1") if self.first else "(nothing)"

    def close(self):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


async def open_many(port, n, *, concurrency, timeout, sources=(HOST,), after_open=None, stop=None):
    """``n`` connections (``Conn``), ``concurrency`` connecting at once, round robin over ``sources``."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    opened: list[Conn] = []
    failed: Counter = Counter()

    async def one(i):
        async with gate:
            if stop is not None and stop.is_set():
                return
            source = sources[i % len(sources)]
            try:
                async with asyncio.timeout(timeout):
                    _, conn = await loop.create_connection(
                        Conn, HOST, port, local_addr=None if source == HOST else (source, 0)
                    )
            except (OSError, TimeoutError) as exc:
                failed[error_name(exc)] += 1
                return
            opened.append(conn)
            if after_open is not None:
                await after_open(conn, i)

    await asyncio.gather(*(one(i) for i in range(n)))
    return opened, failed


def lifetimes(conns, now=None) -> list[float]:
    now = now or time.monotonic()
    return [(c.t_closed or now) - c.t_open for c in conns]


def closed_summary(conns) -> dict:
    return {
        "closed_after": [round(c.t_closed - c.t_open, 2) for c in conns if c.t_closed is not None],
        "answers": dict(Counter(c.status_line for c in conns)),
    }


def merge(messages: list[dict]) -> dict:
    """The messages of several attack processes as one: counts summed, lists joined."""
    out: dict = {}
    for message in messages:
        for key, value in message.items():
            if key == "ev":
                out[key] = value
            elif isinstance(value, bool | str) or value is None:
                out.setdefault(key, value)
            elif isinstance(value, int | float):
                out[key] = (
                    max(out.get(key, value), value)
                    if key.endswith(("seconds", "_s"))
                    else out.get(key, 0) + value
                )
            elif isinstance(value, dict):
                merged = Counter(out.get(key, {}))
                merged.update(value)
                out[key] = dict(merged)
            elif isinstance(value, list) and key == "lived_longer_than":
                out[key] = [a + b for a, b in zip(out.get(key, [0] * len(value)), value, strict=True)]
            elif isinstance(value, list):
                out[key] = out.get(key, []) + value
    if "closed_after" in out:
        closed = out["closed_after"]
        out["closed_by_server"] = len(closed)
        out["closed_after_s"] = [percentile(closed, 0), percentile(closed, 0.5), percentile(closed, 1)]
        del out["closed_after"]
    return out


async def w_idle(p):
    t0 = time.monotonic()
    opened, failed = await open_many(
        p["port"], p["n"], concurrency=p["concurrency"], timeout=p["connect_timeout"]
    )
    t_opened = time.monotonic()
    emit("opened", connected=len(opened), failed=dict(failed), seconds=t_opened - t0)
    while time.monotonic() < t_opened + p["hold"]:
        await asyncio.sleep(1)
        still = sum(c.t_closed is None for c in opened)
        emit("progress", t=round(time.monotonic() - t0, 1), open=still)
        if not still:
            break
    alive = lifetimes(opened)
    emit(
        "result",
        connected=len(opened),
        failed=dict(failed),
        open_seconds=t_opened - t0,
        held_s=time.monotonic() - t_opened,
        still_open=sum(c.t_closed is None for c in opened),
        lived_longer_than=[sum(t > x for t in alive) for x in p["marks"]],
        **closed_summary(opened),
    )
    for c in opened:
        c.close()


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


async def w_slowloris(p):
    t0 = time.monotonic()
    interval = p["drip"]

    async def drip(conn: Conn, i: int):
        async def run():
            await asyncio.sleep(interval * (i % 100) / 100)  # spread the bytes over the interval
            k = 0
            while conn.t_closed is None and not conn.transport.is_closing():
                conn.transport.write(SLOW_HEAD[k : k + 1] if k < len(SLOW_HEAD) else b"a")
                k += 1
                await asyncio.sleep(interval)

        drippers.append(asyncio.create_task(run()))

    drippers: list[asyncio.Task] = []
    opened, failed = await open_many(
        p["port"], p["n"], concurrency=p["concurrency"], timeout=p["connect_timeout"], after_open=drip
    )
    t_opened = time.monotonic()
    emit("opened", connected=len(opened), failed=dict(failed), seconds=t_opened - t0)
    while time.monotonic() < t_opened + p["hold"]:
        await asyncio.sleep(1)
        emit("progress", t=round(time.monotonic() - t0, 1), open=sum(c.t_closed is None for c in opened))
    alive = lifetimes(opened)
    for task in drippers:
        task.cancel()
    emit(
        "result",
        connected=len(opened),
        failed=dict(failed),
        still_open=sum(c.t_closed is None for c in opened),
        lived_longer_than=[sum(t > x for t in alive) for x in p["marks"]],
        **closed_summary(opened),
    )
    for c in opened:
        c.close()


async def w_bigheader(p):
    reader, writer = await asyncio.open_connection(HOST, p["port"], limit=1 << 20)
    t0 = time.monotonic()
    state = {"sent": 0, "answer": None, "answer_at_bytes": None, "answer_s": None, "eof_s": None,
             "read_error": None, "send_error": None}  # fmt: skip

    async def read_answer():
        data = b""
        try:
            while chunk := await reader.read(65536):
                if not data:
                    state["answer_at_bytes"], state["answer_s"] = state["sent"], time.monotonic() - t0
                data = (data + chunk)[:2048]
                state["answer"] = data.split(b"\r\n", 1)[0].decode("latin-1")
        except OSError as exc:
            state["read_error"] = error_name(exc)
        state["eof_s"] = time.monotonic() - t0

    reading = asyncio.create_task(read_answer())
    chunk = b"a" * MB
    total = p["header_mb"] * MB
    last_emit = 0.0
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: ")
        while state["sent"] < total and state["answer"] is None and not reading.done():
            writer.write(chunk)
            await writer.drain()
            state["sent"] += len(chunk)
            if time.monotonic() - last_emit > 0.5:
                last_emit = time.monotonic()
                emit("progress", sent_mb=state["sent"] / MB, t=round(last_emit - t0, 2))
        if state["answer"] is None and not reading.done():
            writer.write(b"\r\n\r\n")
            await writer.drain()
    except OSError as exc:
        state["send_error"] = error_name(exc)
    state["send_s"] = time.monotonic() - t0
    emit("sent", sent_mb=state["sent"] / MB, seconds=state["send_s"])
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.shield(reading)
    writer.close()
    reading.cancel()
    emit("result", **state, sent_mb=state["sent"] / MB)


async def w_streams(p):
    """Streams of one task from ``sources`` (round robin) until one is refused or ``limit`` are open;
    held until told."""
    loop = asyncio.get_running_loop()
    request = request_bytes(p["path"], [("Accept", "text/event-stream")])
    streams: list[Conn] = []

    async def open_stream(source: str) -> tuple[Conn | None, dict | None]:
        conn = None
        try:
            async with asyncio.timeout(p["answer_timeout"]):
                _, conn = await loop.create_connection(Conn, HOST, p["port"], local_addr=(source, 0))
                conn.transport.write(request)
                got = await conn.head_done
        except (OSError, TimeoutError) as exc:
            if conn is not None:
                conn.close()
            return None, {"status_line": f"no answer ({error_name(exc)})", "retry_after": None, "body": ""}
        status_line, status, headers = parse_head(conn.first.split(b"\r\n\r\n", 1)[0])
        if got and status == 200:
            return conn, None
        body = conn.first.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in conn.first else b""
        conn.close()
        return None, {
            "status_line": status_line if got else f"closed ({status_line or 'no answer'})",
            "retry_after": headers.get("retry-after"),
            "body": body.decode("latin-1").strip().split("\n")[0][:200],
        }

    async def phase(sources: list[str], limit: int) -> dict:
        gate = asyncio.Semaphore(p["concurrency"])
        stop = asyncio.Event()
        ok: list[Conn] = []
        refusals: list[dict] = []
        t0 = time.monotonic()

        async def one(i: int):
            async with gate:
                if stop.is_set():
                    return
                conn, refusal = await open_stream(sources[i % len(sources)])
                if conn is not None:
                    ok.append(conn)
                    if len(ok) % 1000 == 0:
                        emit("progress", open=len(ok), t=round(time.monotonic() - t0, 1))
                    return
                refusal["after_ok"] = len(ok)
                refusals.append(refusal)
                stop.set()

        await asyncio.gather(*(one(i) for i in range(limit)))
        streams.extend(ok)
        first = refusals[0] if refusals else None
        return {
            "opened": len(ok),
            "seconds": time.monotonic() - t0,
            "first_refusal": first,
            "refusals": dict(Counter(r["status_line"] for r in refusals)),
            "limit_reached": len(ok) >= limit,
        }

    emit("phase", **await phase(p["sources"], p["limit"]))
    await read_command()  # hold them until told
    still = sum(c.t_closed is None for c in streams)
    for c in streams:
        c.close()
    emit("result", open_at_end=still)


def sockstat() -> dict:
    """The kernel's TCP sockets: orphans (closed by their process, still sending) and memory."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()
            values = dict(zip(parts[1::2], (int(v) for v in parts[2::2]), strict=True))
            return {
                "orphan": values.get("orphan", 0),
                "mem_mb": values.get("mem", 0) * os.sysconf("SC_PAGE_SIZE") / MB,
            }
    return {"orphan": 0, "mem_mb": 0}


def fionread(sock: socket.socket) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


async def w_history(p):
    """Clients that ask for the whole history and never read a byte."""
    loop = asyncio.get_running_loop()
    request = request_bytes(p["path"], [("Accept", "text/event-stream")])
    gate = asyncio.Semaphore(p["concurrency"])
    socks: list[tuple[socket.socket, float]] = []
    failed: Counter = Counter()
    t0 = time.monotonic()

    async def one(i):
        async with gate:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.bind((p["sources"][i % len(p["sources"])], 0))
                async with asyncio.timeout(p["connect_timeout"]):
                    await loop.sock_connect(sock, (HOST, p["port"]))
                    await loop.sock_sendall(sock, request)
            except (OSError, TimeoutError) as exc:
                failed[error_name(exc)] += 1
                sock.close()
                return
            socks.append((sock, time.monotonic()))

    await asyncio.gather(*(one(i) for i in range(p["n"])))
    t_opened = time.monotonic()
    emit("opened", connected=len(socks), failed=dict(failed), seconds=t_opened - t0)
    # What each got (its status line, peeked: nothing is read), once all have an answer or after 15 s.
    answered: dict[int, str] = {}
    while len(answered) < len(socks) and time.monotonic() < t_opened + 15:
        await asyncio.sleep(0.5)
        for sock, _ in socks:
            if sock.fileno() in answered:
                continue
            try:
                line = sock.recv(64, socket.MSG_PEEK).split(b"\r\n", 1)[0].decode("latin-1")
            except BlockingIOError:
                continue
            except OSError as exc:
                line = error_name(exc)
            answered[sock.fileno()] = line or "(closed)"
    answers = Counter(answered.values())
    answers["(nothing)"] = len(socks) - len(answered)
    emit("peeked", answers={k: v for k, v in answers.items() if v}, seconds=time.monotonic() - t_opened)
    poller = select.poll()
    by_fd = {}
    for sock, opened_at in socks:
        poller.register(sock.fileno(), select.POLLRDHUP)
        by_fd[sock.fileno()] = opened_at
    closed_at: dict[int, float] = {}
    unread_peak = 0
    last_emit = time.monotonic()
    told = asyncio.ensure_future(read_command())  # held until the bench says so
    while not told.done():
        for fd, _event in poller.poll(0):  # a FIN or RST seen here (a FIN queued behind unread data is not)
            if fd not in closed_at:
                closed_at[fd] = time.monotonic() - by_fd[fd]
                poller.unregister(fd)
        if time.monotonic() - last_emit >= 1:
            last_emit = time.monotonic()
            unread = sum(fionread(s) for s, _ in socks)
            unread_peak = max(unread_peak, unread)
            emit(
                "progress",
                t=round(last_emit - t0, 1),
                seen_closed=len(closed_at),
                unread_mb=round(unread / MB, 1),
            )
        await asyncio.sleep(0.25)
    lives = list(closed_at.values())
    emit(
        "result",
        connected=len(socks),
        seen_closed=len(closed_at),
        seen_closed_after_s=[percentile(lives, 0), percentile(lives, 0.5), percentile(lives, 1)],
        unread_peak_mb=unread_peak / MB,
    )
    for sock, _ in socks:
        sock.close()
    emit("closed")


WORKERS = {
    "idle": w_idle,
    "slowloris": w_slowloris,
    "bigheader": w_bigheader,
    "streams": w_streams,
    "history": w_history,
}


def worker_main(scenario: str, raw: str) -> None:
    params = json.loads(raw)
    set_nofile(params.get("nofile", 65536))
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        asyncio.run(WORKERS[scenario](params))
    except Exception as exc:
        emit("error", error=f"{error_name(exc)}: {exc}")
        raise


# -- the scenarios (this process: the server, probes, samples, the table) -------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.tree = Path(args.tree).resolve()
        self.env = parse_env(args.env)
        self.database_url = setup_django(self.tree, "hostile")
        self.results: dict[str, dict] = {}
        self.tables: list[str] = []
        self.header_timeout = float(self.env.get("STREAMING_HEADER_TIMEOUT", 10))

    def server(self, name: str, env=None) -> ServerProc:
        return ServerProc(
            self.tree, self.database_url, env={**(env or {}), **self.env}, nofile=self.args.server_nofile,
            name=name,
        )  # fmt: skip

    def report(self, name: str, title: str, rows, data: dict) -> None:
        text = table(title, rows)
        print("\n" + text + "\n", flush=True)
        self.tables.append(text)
        self.results[name] = data

    @staticmethod
    def new_task(**fields):
        from streaming.tests.testapp.models import ScriptedTask

        return ScriptedTask.objects.create(status="created", **fields)

    # -- idle sockets

    async def idle(self):
        a = self.args
        server = self.server("idle")
        task = await asyncio.to_thread(self.new_task, steps=5, delay=0.1)
        try:
            rss0, fds0 = server.rss_kb(), server.fds()
            prober, sampler = Prober(server.port).start(), Sampler(server, interval=0.5).start()
            t0 = time.monotonic()
            marks = [self.header_timeout + 2, 2 * self.header_timeout]
            worker = await Shards(
                "idle",
                {"port": server.port, "n": a.idle_n, "concurrency": 500, "connect_timeout": 5,
                 "hold": max(a.idle_hold, 2 * self.header_timeout + 2), "marks": marks},
                per_process=PER_PROCESS,
            ).start()  # fmt: skip
            opened = await worker.expect("opened")
            t_opened = time.monotonic()
            await asyncio.sleep(1)
            stream = await watch_stream(
                server.port, f"/stream/testapp/ScriptedTask/{task.pk}", expect=6, timeout=15, start=task.start
            )
            result = await worker.expect("result")
            await worker.finish()
            t_end = time.monotonic()
            await prober.stop()
            await sampler.stop()
            rss_peak, fds_peak = sampler.peak(t0, t_end)
            after = server.rss_kb(), server.fds()
            alive = server.alive()
        finally:
            server.stop()
        during = prober.summary(t0, t_end)
        rows = [
            ("sockets connected (failed)", f"{result['connected']:,} ({fails(result['failed'])}) "
             f"in {opened['seconds']:.1f} s"),
            ("closed by the server", f"{result['closed_by_server']:,}, after "
             f"{range_s(result['closed_after_s'])} s (min/p50/max)"),
            ("what they got", answers_text(result["answers"])),
            (f"still open after {marks[0]:g} s / {marks[1]:g} s / end of hold ({result['held_s']:.0f} s)",
             f"{result['lived_longer_than'][0]:,} / {result['lived_longer_than'][1]:,} / "
             f"{result['still_open']:,}"),
            ("server fds before / peak / after", f"{fds0:,} / {fds_peak:,} / {after[1] or '-'}"),
            ("server RSS MB before / peak / after",
             f"{fmt_mb(rss0)} / {fmt_mb(rss_peak)} / {fmt_mb(after[0])}"),
            ("/health during the attack", probe_text(during)),
            ("/health from all connected to the end", probe_text(prober.summary(t_opened, t_end))),
            ("a stream opened during the attack", stream_text(stream, 6)),
            ("server alive at the end", alive),
        ]  # fmt: skip
        self.report(
            "idle", f"Idle sockets: {a.idle_n:,} connect and send nothing", rows,
            {"opened": opened, "result": result, "probes": during, "stream": stream,
             "rss_kb": [rss0, rss_peak, after[0]], "fds": [fds0, fds_peak, after[1]]},
        )  # fmt: skip

    # -- slowloris

    async def slowloris(self):
        a = self.args
        server = self.server("slowloris")
        try:
            rss0, fds0 = server.rss_kb(), server.fds()
            prober, sampler = Prober(server.port).start(), Sampler(server).start()
            t0 = time.monotonic()
            marks = [self.header_timeout + 2, 2 * self.header_timeout]
            worker = await Shards(
                "slowloris",
                {"port": server.port, "n": a.slow_n, "concurrency": 500, "connect_timeout": 5,
                 "drip": a.drip, "hold": 2 * self.header_timeout + 2, "marks": marks},
                per_process=PER_PROCESS,
            ).start()  # fmt: skip
            opened = await worker.expect("opened")
            result = await worker.expect("result")
            await worker.finish()
            t_end = time.monotonic()
            await prober.stop()
            await sampler.stop()
            rss_peak, fds_peak = sampler.peak(t0, t_end)
        finally:
            server.stop()
        during = prober.summary(t0, t_end)
        rows = [
            ("sockets connected (failed)", f"{result['connected']:,} ({fails(result['failed'])})"),
            (f"still open after {marks[0]:g} s", f"{result['lived_longer_than'][0]:,}"),
            (f"still open after {marks[1]:g} s (2x the header timeout)",
             f"{result['lived_longer_than'][1]:,}"),
            ("closed by the server", f"{result['closed_by_server']:,}, after "
             f"{range_s(result['closed_after_s'])} s (min/p50/max)"),
            ("what they got", answers_text(result["answers"])),
            ("server fds before / peak", f"{fds0:,} / {fds_peak:,}"),
            ("server RSS MB before / peak", f"{fmt_mb(rss0)} / {fmt_mb(rss_peak)}"),
            ("/health during", probe_text(during)),
        ]  # fmt: skip
        self.report(
            "slowloris", f"Slowloris: {a.slow_n:,} sockets, one header byte every {a.drip:g} s", rows,
            {"opened": opened, "result": result, "probes": during, "rss_kb": [rss0, rss_peak],
             "fds": [fds0, fds_peak]},
        )  # fmt: skip

    # -- one big header

    async def bigheader(self):
        a = self.args
        server = self.server("bigheader")
        try:
            await asyncio.sleep(1)
            small = {}
            for name, raw in [
                ("a 60 KiB header (under 64 KiB)", big_head(60 * 1024)),
                ("a 100 KiB header, sent at once", big_head(100 * 1024)),
                ("a 1 MiB header, sent at once", big_head(MB)),
                ("a 16 KiB URL", request_bytes("/health?q=" + "a" * 16 * 1024, [("Connection", "close")])),
            ]:
                answer = await fetch(server.port, "/health", raw=raw, timeout=5)
                small[name] = answer["status_line"] or answer["error"]
            await asyncio.sleep(1)
            rss0 = server.rss_kb()
            prober, sampler = Prober(server.port).start(), Sampler(server, interval=0.05).start()
            t0 = time.monotonic()
            worker = await Worker("bigheader", {"port": server.port, "header_mb": a.header_mb}).start()
            result = await worker.expect("result", timeout=300)
            await worker.finish()
            t_closed = time.monotonic()
            await asyncio.sleep(3)
            rss_after = server.rss_kb()
            health_after = await fetch(server.port, "/health")
            await prober.stop()
            await sampler.stop()
            rss_peak, _ = sampler.peak(t0, t_closed)
            alive = server.alive()
        finally:
            server.stop()
        answered = result["answer"] or "(none)"
        if result["answer_at_bytes"] is not None:
            answered += f" after {result['answer_at_bytes'] / MB:,.0f} MB sent, at {result['answer_s']:.2f} s"
        rows = [*small.items()]
        rows += [
            (f"{a.header_mb} MB header: sent",
             f"{result['sent_mb']:,.0f} of {a.header_mb} MB in {result['send_s']:.2f} s"
             + (f" (send failed: {result['send_error']})" if result["send_error"] else "")),
            (f"{a.header_mb} MB header: answer", answered),
            ("connection closed by the server", "yes" if result["eof_s"] is not None and result["eof_s"] < 60
             else "no"),
            ("server RSS MB before / peak / 3 s after close", f"{fmt_mb(rss0)} / {fmt_mb(rss_peak)} / "
             f"{fmt_mb(rss_after)}"),
            ("/health during", probe_text(prober.summary(t0, t_closed))),
            ("/health after", health_after["status_line"] or health_after["error"]),
            ("server alive at the end", alive),
        ]  # fmt: skip
        self.report(
            "bigheader", f"Big request heads; then one request with a {a.header_mb} MB header", rows,
            {"result": result, "rss_kb": [rss0, rss_peak, rss_after], "probes": prober.summary(t0, t_closed),
             "small": small},
        )  # fmt: skip

    # -- stream limits

    async def streams(self):
        a = self.args
        server = self.server("streams")
        idle_task = await asyncio.to_thread(self.new_task, steps=1)
        other = await asyncio.to_thread(self.new_task, steps=3, delay=0.05)
        sources = [f"127.0.0.{2 + i}" for i in range(a.stream_sources + 1)]
        try:
            rss0, fds0 = server.rss_kb(), server.fds()
            sampler = Sampler(server, interval=0.5).start()
            t0 = time.monotonic()
            path = f"/stream/testapp/ScriptedTask/{idle_task.pk}"
            common = {"port": server.port, "path": path, "concurrency": 200, "answer_timeout": 5}
            workers = []

            async def phase(sources, limit):
                """Attack processes one after another (each holds at most PER_PROCESS) until a refusal."""
                total = {"opened": 0, "seconds": 0.0, "first_refusal": None, "refusals": {}}
                while limit > 0:
                    take = min(limit, PER_PROCESS)
                    worker = await Worker(
                        "streams", {**common, "sources": sources, "limit": take, "nofile": take + 1000}
                    ).start()
                    workers.append(worker)
                    got = await worker.expect("phase", timeout=600)
                    if got["first_refusal"] is not None and total["first_refusal"] is None:
                        total["first_refusal"] = {**got["first_refusal"]}
                        total["first_refusal"]["after_ok"] += total["opened"]
                    total["opened"] += got["opened"]
                    total["seconds"] += got["seconds"]
                    total["refusals"] = dict(Counter(total["refusals"]) + Counter(got["refusals"]))
                    limit -= take
                    if got["first_refusal"] is not None:
                        break
                return total

            one = await phase(sources[:1], a.per_client_max)
            many = await phase(sources[1:], a.stream_max)
            held = {"open": one["opened"] + many["opened"]}
            rss_held, fds_held = server.rss_kb(), server.fds()
            health = [await fetch(server.port, "/health", timeout=3) for _ in range(5)]
            again = await fetch(
                server.port, f"/stream/testapp/ScriptedTask/{idle_task.pk}", timeout=5, source=sources[0],
                headers=[("Accept", "text/event-stream")],
            )  # fmt: skip
            stream = await watch_stream(
                server.port,
                f"/stream/testapp/ScriptedTask/{other.pk}",
                expect=4,
                timeout=15,
                start=other.start,
            )
            for worker in workers:
                worker.send("close")
            result = merge([await worker.expect("result") for worker in workers])
            held["open_at_end"] = result["open_at_end"]
            for worker in workers:
                await worker.finish()
            await sampler.stop()
            rss_peak, fds_peak = sampler.peak(t0)
            rss_peak, fds_peak = max(rss_peak or 0, rss_held or 0), max(fds_peak or 0, fds_held or 0)
            alive = server.alive()
        finally:
            server.stop()
        ok = [h["latency"] for h in health if h["status"] == 200]
        health_text = f"{len(ok)}/5 ok" + (f", p50 {fmt_ms(percentile(ok, 0.5))} ms" if ok else "")
        if len(ok) < 5:
            health_text += "; " + ", ".join(
                sorted({h["error"] or h["status_line"] for h in health if h["status"] != 200})
            )
        rows = [
            ("one client address: streams open at the first refusal",
             refusal_count(one, a.per_client_max)),
            ("one client address: first refusal", refusal_text(one["first_refusal"])),
            (f"{a.stream_sources} more addresses: streams open at the first refusal",
             refusal_count(many, a.stream_max)
             + (f"; {one['opened'] + many['first_refusal']['after_ok']:,} from all addresses"
                if many["first_refusal"] else "")),
            ("more addresses: first refusal", refusal_text(many["first_refusal"])),
            ("streams held (all addresses)",
             f"{held['open']:,}, opened in {one['seconds'] + many['seconds']:.1f} s"),
            ("server fds / RSS MB while held", f"{fds_held:,} / {fmt_mb(rss_held)} (peak {fds_peak:,} / "
             f"{fmt_mb(rss_peak)}); before {fds0:,} / {fmt_mb(rss0)}"),
            ("/health while held (5 probes)", health_text),
            ("the first client asks again", again["status_line"] or again["error"]),
            ("a stream of another client (127.0.0.1) while held", stream_text(stream, 4)),
            ("server alive at the end", alive),
        ]  # fmt: skip
        self.report(
            "streams", "Stream limits: open streams until refused", rows,
            {"one_client": one, "many_clients": many, "held": held, "health": [h["status"] for h in health],
             "again": again["status_line"], "stream": stream, "result": result,
             "rss_kb": [rss0, rss_held, rss_peak], "fds": [fds0, fds_held, fds_peak]},
        )  # fmt: skip

    # -- ?history=all, never read

    async def history(self):
        a = self.args
        t = time.monotonic()
        task = await asyncio.to_thread(finished_task, a.history_events, a.history_payload)
        made = time.monotonic() - t
        env = {"STREAMING_CLIENT_SEND_TIMEOUT": str(a.send_timeout)}
        send_timeout = float(self.env.get("STREAMING_CLIENT_SEND_TIMEOUT", a.send_timeout))
        server = self.server("history", env)
        try:
            await asyncio.sleep(1)
            rss0, fds0 = server.rss_kb(), server.fds()
            prober, sampler = Prober(server.port).start(), Sampler(server).start()
            t0 = time.monotonic()
            worker = await Worker(
                "history",
                {"port": server.port, "path": f"/stream/testapp/ScriptedTask/{task.pk}?history=all",
                 "n": a.history_n, "concurrency": 500, "connect_timeout": 10,
                 "sources": [f"127.0.0.{2 + i}" for i in range(a.history_sources)],
                 "nofile": a.history_n + 2000},
            ).start()  # fmt: skip
            opened = await worker.expect("opened", timeout=120)
            t_opened = time.monotonic()
            peeked = await worker.expect("peeked")
            # Cut: the server has closed every one of them (its fds are back where they were).
            cut = None
            while time.monotonic() < t_opened + send_timeout + 60:
                fds = server.fds()
                if fds is not None and fds <= fds0 + 2:
                    cut = time.monotonic() - t_opened
                    break
                await asyncio.sleep(0.2)
            t_cut = time.monotonic()
            rss_peak, fds_peak = sampler.peak(t0, t_cut)
            await asyncio.sleep(2)
            rss_cut, fds_cut, kernel_cut = server.rss_kb(), server.fds(), sockstat()
            worker.send("close")
            result = await worker.expect("result")
            await worker.expect("closed")
            await worker.finish()
            t_closed = time.monotonic()
            await asyncio.sleep(3)
            rss_closed, fds_closed, kernel_closed = server.rss_kb(), server.fds(), sockstat()
            await asyncio.sleep(7)
            rss_later = server.rss_kb()
            await prober.stop()
            await sampler.stop()
            health_after = await fetch(server.port, "/health")
            alive = server.alive()
        finally:
            server.stop()
        rows = [
            ("task", f"{a.history_events:,} events of ~{a.history_payload + 130} B in its log "
             f"(made in {made:.1f} s)"),
            ("clients connected (failed)", f"{opened['connected']:,} ({fails(opened['failed'])}) "
             f"in {opened['seconds']:.1f} s"),
            (f"what they got (from {a.history_sources} client addresses)",
             f"{answers_text(peeked['answers'])} (within {peeked['seconds']:.1f} s)"),
            ("bytes waiting unread in the clients' sockets (peak)", f"{result['unread_peak_mb']:,.0f} MB"),
            ("all cut by the server (its fds back to before)",
             f"after {cut:.1f} s (CLIENT_SEND_TIMEOUT {send_timeout:g} s)" if cut is not None
             else f"no: {fds_cut - fds0:,} still open {t_cut - t_opened:.0f} s after they connected"),
            ("the clients saw a FIN or RST", f"{result['seen_closed']:,} of {result['connected']:,}"),
            ("kernel TCP orphans / TCP memory MB: after the cut / after close",
             f"{kernel_cut['orphan']:,} / {kernel_cut['mem_mb']:,.0f}; "
             f"{kernel_closed['orphan']:,} / {kernel_closed['mem_mb']:,.0f}"),
            ("server RSS MB: before / peak while they hang", f"{fmt_mb(rss0)} / {fmt_mb(rss_peak)}"),
            ("server RSS MB: 2 s after the cut / 3 s after they close / 10 s after",
             f"{fmt_mb(rss_cut)} / {fmt_mb(rss_closed)} / {fmt_mb(rss_later)}"),
            ("server fds: before / peak / after the cut / after close",
             f"{fds0:,} / {fds_peak:,} / {fds_cut:,} / {fds_closed:,}"),
            ("/health while they hang", probe_text(prober.summary(t_opened, t_cut))),
            ("/health after", health_after["status_line"] or health_after["error"]),
            ("server alive at the end", alive),
        ]  # fmt: skip
        self.report(
            "history", f"History: {a.history_n:,} clients open ?history=all and never read", rows,
            {"opened": opened, "peeked": peeked, "cut_s": cut, "result": result, "send_timeout": send_timeout,
             "kernel": {"after_cut": kernel_cut, "after_close": kernel_closed},
             "rss_kb": {"before": rss0, "peak": rss_peak, "after_cut": rss_cut, "after_close": rss_closed,
                        "later": rss_later},
             "fds": [fds0, fds_peak, fds_cut, fds_closed], "closed_at_s": t_closed - t0},
        )  # fmt: skip

    # -- WebSocket upgrades

    async def websocket(self):
        server = self.server("websocket")
        task = await asyncio.to_thread(self.new_task, steps=1)
        paths = ["/admin/", "/", f"/stream/testapp/ScriptedTask/{task.pk}"]
        answers = {}
        try:
            before = server.log_text()
            for path in paths:
                raw = request_bytes(
                    path,
                    [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")],
                )  # fmt: skip
                answer = await fetch(server.port, path, raw=raw, timeout=5)
                answers[path] = answer["status_line"] or answer["error"]
            await asyncio.sleep(1)
            health = await fetch(server.port, "/health")
            log = server.log_text()[len(before) :]
        finally:
            server.stop()
        tracebacks = log.count("Traceback (most recent call last)")
        last_error = next((line for line in reversed(log.splitlines()) if "Error" in line), "")
        rows = [(f"upgrade to {path.replace(str(task.pk), '<id>')}", answers[path]) for path in paths]
        rows += [
            ("tracebacks in the server log",
             f"{tracebacks}" + (f" (last: {last_error.strip()[:120]})" if tracebacks else "")),
            ("/health after", health["status_line"] or health["error"]),
        ]  # fmt: skip
        self.report("websocket", "WebSocket upgrades", rows, {"answers": answers, "tracebacks": tracebacks,
                                                             "log": log[-4000:]})  # fmt: skip


def big_head(size: int) -> bytes:
    return (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    )


def fails(failed: dict) -> str:
    return ", ".join(f"{k} x{v:,}" for k, v in failed.items()) or "0"


def range_s(values) -> str:
    if not values or values[0] is None:
        return "-"
    return " / ".join(f"{v:.1f}" for v in values)


def answers_text(answers: dict) -> str:
    return ", ".join(f"{k} x{v:,}" for k, v in answers.items()) or "-"


def stream_text(stream: dict, expect: int) -> str:
    text = f"{stream['status_line'] or 'no answer'}; {stream['events']}/{expect} events"
    text += f" in {stream['seconds']:.2f} s"
    if stream["error"]:
        text += f" ({stream['error']})"
    return text


def refusal_count(phase: dict, limit: int) -> str:
    if phase["first_refusal"] is None:
        return f"none refused up to {phase['opened']:,} (the bench's cap, {limit:,})"
    return f"{phase['first_refusal']['after_ok']:,} ({phase['opened']:,} in all, in {phase['seconds']:.1f} s)"


def refusal_text(refusal: dict | None) -> str:
    if refusal is None:
        return "-"
    text = refusal["status_line"]
    if refusal["retry_after"]:
        text += f", Retry-After: {refusal['retry_after']}"
    if refusal["body"]:
        text += f", body: {refusal['body'][:100]!r}"
    return text


SCENARIOS = ["idle", "slowloris", "bigheader", "streams", "history", "websocket"]


def main():
    if sys.argv[1:2] == ["_worker"]:
        return worker_main(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name in SCENARIOS:
        parser.add_argument(f"--{name}", action="store_true", help=f"run the {name} scenario")
    parser.add_argument("--all", action="store_true", help="every scenario, in the order above")
    parser.add_argument("--tree", default=str(REPO), help="checkout whose server runs (default: this one)")
    parser.add_argument("--env", action="append", metavar="KEY=VALUE", help="server environment (repeatable)")
    parser.add_argument("--server-nofile", type=int, default=20000, help="the server's fd limit (20000)")
    parser.add_argument("--idle-n", type=int, default=21000, help="idle sockets (21000)")
    parser.add_argument("--idle-hold", type=float, default=25, help="seconds the idle sockets are held (25)")
    parser.add_argument("--slow-n", type=int, default=2000, help="slowloris sockets (2000)")
    parser.add_argument("--drip", type=float, default=3, help="slowloris: seconds between header bytes (3)")
    parser.add_argument("--header-mb", type=int, default=200, help="big header: MB (200)")
    parser.add_argument(
        "--per-client-max", type=int, default=2000, help="streams: cap from one address (2000)"
    )
    parser.add_argument("--stream-max", type=int, default=25000, help="streams: cap from the others (25000)")
    parser.add_argument("--stream-sources", type=int, default=100, help="streams: other addresses (100)")
    parser.add_argument("--history-n", type=int, default=1000, help="history: clients (1000)")
    parser.add_argument(
        "--history-sources", type=int, default=4, help="history: client addresses (4: under 500 streams each)"
    )
    parser.add_argument("--history-events", type=int, default=100_000, help="history: events in the log")
    parser.add_argument("--history-payload", type=int, default=100, help="history: filler bytes per event")
    parser.add_argument("--send-timeout", type=float, default=5, help="history: CLIENT_SEND_TIMEOUT (5)")
    parser.add_argument("--label", default="", help="a name for this run in the output (e.g. before)")
    args = parser.parse_args()
    chosen = SCENARIOS if args.all else [name for name in SCENARIOS if getattr(args, name)]
    if not chosen:
        parser.error("choose scenarios (--idle, --slowloris, ...) or --all")
    set_nofile(8192)
    bench = Bench(args)
    print(f"tree: {bench.tree} ({tree_commit(bench.tree)}); server fd limit {args.server_nofile:,}; "
          f"env: {bench.env or '-'}", flush=True)  # fmt: skip

    async def run():
        for name in chosen:
            print(f"== {name}", flush=True)
            t = time.monotonic()
            await getattr(bench, name)()
            print(f"({name}: {time.monotonic() - t:.0f} s)", flush=True)

    asyncio.run(run())
    print(f"\n## hostile.py {args.label} — {bench.tree} ({tree_commit(bench.tree)})\n")
    print("\n\n".join(bench.tables))
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"hostile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    payload = {"tree": str(bench.tree), "commit": tree_commit(bench.tree), "args": vars(args),
               "cores": os.cpu_count(), "results": bench.results}  # fmt: skip
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
