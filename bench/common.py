"""Shared bench machinery: servers as subprocesses, a bench database, the load client."""

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BENCH_DIR = Path(tempfile.gettempdir()) / "streaming-bench"
DATABASE_URL = f"sqlite:///{BENCH_DIR / 'bench.sqlite3'}"


def setup_django(fresh: bool = True):
    """Point this process at a fresh bench database and set Django up."""
    BENCH_DIR.mkdir(exist_ok=True)
    if fresh:
        for path in BENCH_DIR.glob("bench.sqlite3*"):
            path.unlink()
    os.environ["DATABASE_URL"] = DATABASE_URL
    os.environ["STREAMING_TEST_APPS"] = "1"  # the benchmarks' ScriptedTask
    os.environ.pop("STREAMING_BROKER_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).text == "OK":
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


class Server:
    def __init__(self, *, workers=1, broker_url=None, **streaming):
        self.port = free_port()
        self.workers = workers
        env = dict(os.environ, DATABASE_URL=DATABASE_URL, PYTHONUNBUFFERED="1")
        env.pop("STREAMING_BROKER_URL", None)
        if broker_url:
            env["STREAMING_BROKER_URL"] = broker_url
        streaming.setdefault("shutdown_grace", 0)  # stop at once, whatever still runs
        # The load client opens every stream from one address: the per-client
        # limit (500 by default) would refuse most of them.
        streaming.setdefault("max_streams_per_client", 1_000_000)
        for key, value in streaming.items():
            env[f"STREAMING_{key.upper()}"] = str(value)
        self.log = open(BENCH_DIR / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "runserver_stream", "--port", str(self.port),
             "--workers", str(workers), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_healthy(self.port, self.proc, 30, f"server (see {self.log.name})")
        time.sleep(0.5 * workers)  # every worker up, not just the first
        self.scrapes = 0
        # BENCH_SCRAPE_EVERY=1 (with STREAMING_METRICS=1 and STREAMING_METRICS_TOKEN): a
        # Prometheus-like scraper reads /metrics that often while the benchmark runs.
        every = float(os.environ.get("BENCH_SCRAPE_EVERY") or 0)
        if every:
            threading.Thread(target=self._scrape, args=(every,), daemon=True).start()

    def _scrape(self, every: float) -> None:
        headers = {"authorization": f"Bearer {os.environ['STREAMING_METRICS_TOKEN']}"}
        while self.proc.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{self.port}/metrics", headers=headers, timeout=10)
            except httpx.TransportError:
                break
            if response.status_code != 200:
                raise RuntimeError(f"/metrics answered {response.status_code}: {response.text}")
            self.scrapes += 1
            time.sleep(every)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def rss_kb(self) -> int:
        """RSS of the server and its workers, in KB."""
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        return rss_kb_of(pids)


def load(
    port: int, path: str, *, connections: int, expect: int, start, timeout=300, latency_sample=50
) -> dict:
    """Run the load client; call ``start()`` once all its connections are open."""
    client = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "loadclient.py"), "--port", str(port),
         "--path", path, "--connections", str(connections), "--expect", str(expect),
         "--timeout", str(timeout), "--latency-sample", str(latency_sample)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = client.stdout.readline()
    if line.strip() != "READY":
        client.kill()
        raise RuntimeError(f"load client failed: {line!r}")
    start()
    result = json.loads(client.stdout.readline())
    client.wait(30)
    if result.get("refused"):
        raise RuntimeError(f"the server refused {result['refused']} streams: {result['refused_first']}")
    return result


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


class Ceiling:
    """bench/ceiling.py as a subprocess."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "ceiling.py"), "--port", str(self.port)], cwd=REPO
        )
        wait_healthy(self.port, self.proc, 10, "ceiling server")

    def start(self, events: int, delay: float = 0.0, payload: int = 100) -> None:
        httpx.get(
            f"http://127.0.0.1:{self.port}/start?events={events}&delay={delay}&payload={payload}",
            timeout=10,
        )

    def rss_kb(self) -> int:
        return rss_kb_of([self.proc.pid])

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def rss_kb_of(pids) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total
