"""Servers: runserver_stream against the plain ASGI path under uvicorn and granian, in one run.

    poetry run python bench/servers.py [--watchers 1000] [--events 1000] [--idle 5000] \\
        [--servers runserver_stream,uvicorn,granian]

The same app (config.asgi) and database behind three servers, one worker each:
runserver_stream (uvicorn parses the request, the broker writes to the socket
directly), and uvicorn and granian serving the streams through plain ASGI
(the node runs in the ASGI lifespan). Each server, and the raw-asyncio
ceiling first, runs on a fresh process: N idle streams on a task not started
(KB of RSS per stream, then the time for one event to reach all of them, as
bench/idle.py), then C watchers on a fresh task sending K events as fast as it
can (delivered events/s, as bench/fanout.py), then C watchers on 20 events at
5/s (send-to-receipt latency, every watcher timed). Prints a table with ratios
to the ceiling and writes bench/results/servers-*.json. granian is optional:
without it its row is skipped.
"""

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from common import (
    BENCH_DIR,
    DATABASE_URL,
    REPO,
    Ceiling,
    Server,
    free_port,
    machine,
    rss_kb_of,
    save,
    setup_django,
    wait_healthy,
)
from fanout import ceiling as ceiling_run
from fanout import ours
from idle import measure

PACED_EVENTS, RATE = 20, 5.0

LABELS = {"runserver_stream": "runserver_stream", "uvicorn": "uvicorn ASGI", "granian": "granian ASGI"}
ASGI_COMMANDS = {
    "uvicorn": lambda port: [
        sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1",
        "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "on",
        "--log-level", "warning", "--no-access-log",
    ],
    # --interface asgi runs the lifespan (asginl would not). Its defaults hold
    # 1,024 connections in the backlog and serve 1,024 requests at once: too
    # few for thousands of open streams, so both are raised.
    "granian": lambda port: [
        sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
        "--port", str(port), "--loop", "uvloop", "--workers", "1", "--log-level", "warning",
        "--backlog", "16384", "--backpressure", "16384",
        "--no-access-log", "config.asgi:application",
    ],
}  # fmt: skip


class Command:
    """Any server command as a subprocess with the bench environment, up once /health answers."""

    def __init__(self, name, command):
        self.port = free_port()
        env = dict(os.environ, DATABASE_URL=DATABASE_URL, PYTHONUNBUFFERED="1", STREAMING_SHUTDOWN_GRACE="0")
        env["STREAMING_MAX_STREAMS_PER_CLIENT"] = "1000000"  # one load client, one address
        env.pop("STREAMING_BROKER_URL", None)
        self.log = open(BENCH_DIR / f"{name}-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command(self.port), cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that a kill reaches its workers
        )  # fmt: skip
        try:
            wait_healthy(self.port, self.proc, 30, f"{name} (see {self.log.name})")
        except BaseException:
            self.stop()
            raise
        time.sleep(0.5)  # as common.Server

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def rss_kb(self) -> int:
        """RSS of the server and every process below it (granian runs its worker in a child), in KB."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                todo += [int(p) for p in children.read_text().split()]
        return rss_kb_of(pids)


def start(name):
    if name == "runserver_stream":
        return Server()
    return Command(name, ASGI_COMMANDS[name])


def scenarios(server, run, idle_stream, args):
    """Idle, fast, paced on one server: ``idle_stream()`` gives (path, start) of a fresh one-event
    stream, ``run(server, watchers=, events=, delay=)`` a load run on a fresh task."""
    path, go = idle_stream()
    idle = measure(server, path, args.idle, go)
    fast = run(server, watchers=args.watchers, events=args.events, delay=0)
    paced = run(server, watchers=args.watchers, events=PACED_EVENTS, delay=1 / RATE)
    return {"idle": idle, "fast": fast, "paced": paced, "rss_kb_end": server.rss_kb()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--servers", default="runserver_stream,uvicorn,granian")
    args = parser.parse_args()
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = set(names) - set(LABELS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))} (choose from {', '.join(LABELS)})")
    if "granian" in names and importlib.util.find_spec("granian") is None:
        print("granian not installed (pip install granian); skipped", flush=True)
        names.remove("granian")
    setup_django()
    from streaming.tests.testapp.models import ScriptedTask

    def idle_task():
        task = ScriptedTask.objects.create(steps=1, status="created")
        return f"/stream/testapp/ScriptedTask/{task.pk}", task.start

    def run_ours(server, **kw):
        return ours(server, ScriptedTask, **kw)

    roof = Ceiling()
    try:
        results = {"ceiling": scenarios(roof, ceiling_run, lambda: ("/stream", lambda: roof.start(1)), args)}
    finally:
        roof.stop()
    print(f"ceiling: {results['ceiling']['fast']['events_per_s']:,.0f} events/s", flush=True)
    for name in names:
        server = None
        try:
            server = start(name)
            results[name] = scenarios(server, run_ours, idle_task, args)
        except RuntimeError as exc:  # did not start, or a load client failed: report it, go on
            results[name] = {"error": str(exc)}
            print(f"{LABELS[name]}: {exc}", flush=True)
            continue
        finally:
            if server is not None:
                server.stop()
        print(f"{LABELS[name]}: {results[name]['fast']['events_per_s']:,.0f} events/s", flush=True)

    c = results["ceiling"]
    print()
    print(
        f"{args.watchers:,} watchers: {args.events:,} events as fast as sent; {PACED_EVENTS} events at "
        f"{RATE:g}/s; {args.idle:,} idle streams then one event"
    )
    print(
        "| server | fast events/s | ratio to ceiling | paced p99 ms | ratio to ceiling p99 | idle KB/stream "
        "| one event to all ms | complete |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in ["ceiling", *names]:
        r = results[name]
        if "error" in r:
            print(f"| {LABELS[name]} | | | | | | | False ({r['error']}) |")
            continue
        fast, p99 = r["fast"]["events_per_s"] or 0, r["paced"]["latency_ms"]["p99"]
        complete = r["fast"]["complete"] and r["paced"]["complete"] and r["idle"]["complete"]
        print(
            f"| {LABELS.get(name, name)} | {fast:,.0f} | {fast / c['fast']['events_per_s']:.2f} | "
            f"{p99:.1f} | {p99 / c['paced']['latency_ms']['p99']:.2f} | "
            f"{r['idle']['kb_per_stream']:.1f} | {r['idle']['latency_ms']['max']:.0f} | {complete} |"
        )
    versions = {pkg: version(pkg) for pkg in ("uvicorn", "granian") if importlib.util.find_spec(pkg)}
    path = save(
        "servers",
        {"machine": machine(), "args": vars(args), "paced": {"events": PACED_EVENTS, "rate": RATE},
         "versions": versions, "results": results},
    )  # fmt: skip
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
