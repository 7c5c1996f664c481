"""Soak: churn thousands of connections for minutes against one server; is its memory flat?

    .venv/bin/python bench/soak.py [--minutes 3] [--rate 60] [--tree OTHER_CHECKOUT] \\
        [--env STREAMING_HEADER_TIMEOUT=5] [--server-nofile 20000]

One ``runserver_stream`` (SQLite in the hostile bench directory, the test
app's ScriptedTask). This process starts a running task every
--task-every seconds (--steps events at --delay s: live streams) and makes
--finished finished tasks of --finished-events events up front; a separate
process (``soak.py _worker``) opens --rate connections a second, a steady
mix of:

  stream   a stream of a running or finished task, read 1-30 events or 0.5-3 s, leave
  resume   the same with a Last-Event-ID somewhere in the task's events
  history  ?history=all of a finished task, read to its end
  status   the JSON status (Accept: application/json)
  bad      a malformed id, a malformed Last-Event-ID, an unknown model, a
           missing row, an unknown history value: a 4xx is expected
  idle     connect and send nothing; the server should cut it (header
           timeout), else the client leaves after --idle-hold s

Every --interval (10) s: the server's RSS (/proc/<pid>/status VmRSS) and
open fds (/proc/<pid>/fd), the connections of each kind, 5xx answers,
connection errors, and /health (probed every 200 ms) p50/p99. Prints a row
per interval, then a summary: RSS start/end/max and its slope over the
second half (MB/min), fds start/end, totals. Results also go to
bench/results/soak-*.json.
"""

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from hostile import (
    REPO,
    Prober,
    ServerProc,
    Worker,
    emit,
    error_name,
    finished_task,
    fmt_mb,
    fmt_ms,
    parse_env,
    parse_head,
    request_bytes,
    set_nofile,
    setup_django,
    tree_commit,
)

SCRIPT = str(Path(__file__).resolve())
HOST = "127.0.0.1"
MIX = {"stream": 30, "resume": 15, "history": 5, "status": 15, "bad": 25, "idle": 10}
BAD = [
    ("/stream/testapp/ScriptedTask/not-a-number", ()),
    ("/stream/testapp/ScriptedTask/{pk}", (("Last-Event-ID", "12x"),)),
    ("/stream/testapp/ScriptedTask/{pk}", (("Last-Event-ID", "-3"),)),
    ("/stream/testapp/NoSuchModel/1", ()),
    ("/stream/nosuchapp/ScriptedTask/1", ()),
    ("/stream/testapp/ScriptedTask/987654321", ()),
    ("/stream/testapp/ScriptedTask/{pk}?history=maybe", ()),
    ("/stream/only-two/parts", ()),
]


# -- the load process -----------------------------------------------------------------------------


class Load:
    def __init__(self, p):
        self.p = p
        self.running: list[tuple[int, int]] = []  # (pk, events it will have)
        self.finished: list[tuple[int, int]] = []
        self.stats: Counter = Counter()
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self.server_errors: list[str] = []
        self.open = 0
        self.tasks: set[asyncio.Task] = set()
        self.ready = asyncio.Event()

    def task(self, kind: str) -> tuple[int, int]:
        pool = self.finished if kind == "history" or not self.running else random.choice(
            [self.running[-10:], self.finished]
        )  # fmt: skip
        return random.choice(pool)

    async def one(self, kind: str) -> None:
        self.open += 1
        self.stats[kind] += 1
        writer = None
        try:
            if kind == "idle":
                return await self.idle()
            pk, events = self.task(kind)
            headers: list[tuple[str, str]] = []
            path = f"/stream/testapp/ScriptedTask/{pk}"
            if kind == "resume":
                headers.append(("Last-Event-ID", str(random.randint(1, max(1, events)))))
            elif kind == "history":
                path += "?history=all"
            elif kind == "status":
                headers.append(("Accept", "application/json"))
            elif kind == "bad":
                template, extra = random.choice(BAD)
                path, headers = template.format(pk=pk), list(extra)
            async with asyncio.timeout(self.p["timeout"]):
                reader, writer = await asyncio.open_connection(HOST, self.p["port"], limit=1 << 20)
                writer.write(request_bytes(path, headers))
                head = await reader.readuntil(b"\r\n\r\n")
            _, status, hdrs = parse_head(head)
            self.statuses[f"{kind} {status}"] += 1
            if status is None or status >= 500:
                self.stats["5xx"] += 1
                self.server_errors.append(f"{kind} {path} -> {head[:80]!r}")
            elif kind == "bad" and not 400 <= status < 500:
                self.stats["bad_not_4xx"] += 1
            if status == 200 and kind in ("stream", "resume", "history"):
                await self.read_stream(reader, kind)
            elif status == 200 and kind == "status":
                length = int(hdrs.get("content-length", "0"))
                json.loads(await reader.readexactly(length))
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ) as exc:
            self.errors[f"{kind} {error_name(exc)}"] += 1
        finally:
            self.open -= 1
            if writer is not None:
                writer.close()

    async def read_stream(self, reader: asyncio.StreamReader, kind: str) -> None:
        want = 10**9 if kind == "history" else random.randint(1, 30)
        seen, tail = 0, b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.p["timeout"] if kind == "history" else random.uniform(0.5, 3)):
                while seen < want:
                    chunk = await reader.read(65536)
                    if not chunk:
                        self.stats[f"{kind} ended"] += 1
                        break
                    seen += (tail + chunk).count(b"\nid: ")
                    tail = chunk[-4:]
        self.stats["events"] += seen

    async def idle(self) -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, self.p["port"])
        except OSError as exc:
            self.errors[f"idle {error_name(exc)}"] += 1
            return
        try:
            async with asyncio.timeout(self.p["idle_hold"]):
                data = await reader.read(4096)
                if data:
                    status = parse_head(data.split(b"\r\n\r\n")[0])[1]
                    self.statuses[f"idle {status}"] += 1
                    if status is not None and status >= 500:
                        self.stats["5xx"] += 1
                    await reader.read()
            self.stats["idle cut"] += 1
        except TimeoutError:
            self.stats["idle left"] += 1
        except OSError as exc:
            self.stats["idle cut"] += 1
            self.errors[f"idle {error_name(exc)}"] += 1
        finally:
            writer.close()

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            words = line.split()
            if words[0] == "task":
                pool = self.running if words[1] == "running" else self.finished
                pool.append((int(words[2]), int(words[3])))
                if self.finished:
                    self.ready.set()
                self.running = self.running[-50:]
            elif words[0] == "tick":
                emit("stats", stats=dict(self.stats), statuses=dict(self.statuses), errors=dict(self.errors),
                     server_errors=self.server_errors[:5], open=self.open)  # fmt: skip
                self.stats, self.statuses, self.errors, self.server_errors = (
                    Counter(),
                    Counter(),
                    Counter(),
                    [],
                )
            elif words[0] == "stop":
                return

    async def run(self) -> None:
        commands = asyncio.create_task(self.commands())
        await self.ready.wait()  # the bench sends the tasks first
        kinds, weights = list(MIX), list(MIX.values())
        start, n = time.monotonic(), 0
        emit("started")
        while not commands.done():
            n += 1
            kind = random.choices(kinds, weights)[0]
            job = asyncio.create_task(self.one(kind))
            self.tasks.add(job)
            job.add_done_callback(self.tasks.discard)
            await asyncio.sleep(max(0.0, start + n / self.p["rate"] - time.monotonic()))
        for job in list(self.tasks):
            job.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        emit("stopped")


def worker_main(raw: str) -> None:
    params = json.loads(raw)
    set_nofile(params.get("nofile", 20000))
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(Load(params).run())


# -- the bench ------------------------------------------------------------------------------------


def running_task(steps: int, delay: float):
    from streaming.tests.testapp.models import ScriptedTask

    task = ScriptedTask.objects.create(status="created", steps=steps, delay=delay, payload_size=50)
    task.start()
    return task


async def soak(args, server: ServerProc) -> dict:
    from streaming.tests.testapp.models import ScriptedTask

    worker = await Worker(
        "soak",
        {"port": server.port, "rate": args.rate, "timeout": 10, "idle_hold": args.idle_hold, "nofile": 20000},
        script=SCRIPT,
    ).start()
    for _ in range(args.finished):
        task = await asyncio.to_thread(finished_task, args.finished_events, 50)
        worker.send(f"task finished {task.pk} {args.finished_events}")
    prober = Prober(server.port, interval=0.2, timeout=3).start()
    await worker.expect("started")
    t0 = time.monotonic()
    rows = [{"t": 0, "rss_kb": server.rss_kb(), "fds": server.fds()}]
    print_header()
    print_row(rows[0])
    next_task, next_tick = t0, t0 + args.interval
    end = t0 + args.minutes * 60
    done_running: list[tuple[float, int, int]] = []
    while next_tick <= end + 0.001:  # up to and with the last row
        now = time.monotonic()
        if now >= next_task:
            task = await asyncio.to_thread(running_task, args.steps, args.delay)
            worker.send(f"task running {task.pk} {args.steps + 1}")
            done_running.append((now + args.steps * args.delay + 5, task.pk, args.steps + 1))
            next_task += args.task_every
        while done_running and done_running[0][0] <= now:  # ended by now: a finished task to resume
            _, pk, events = done_running.pop(0)
            worker.send(f"task finished {pk} {events}")
        if now >= next_tick:
            worker.send("tick")
            stats = await worker.expect("stats")
            row = {
                "t": round(now - t0),
                "rss_kb": server.rss_kb(),
                "fds": server.fds(),
                "health": prober.summary(next_tick - args.interval, next_tick),
                **stats,
            }
            rows.append(row)
            print_row(row)
            next_tick += args.interval
        await asyncio.sleep(0.05)
    worker.send("stop")
    await worker.expect("stopped", timeout=60)
    await worker.finish()
    await prober.stop()
    await asyncio.sleep(5)
    after = {"rss_kb": server.rss_kb(), "fds": server.fds()}
    tasks = await asyncio.to_thread(lambda: Counter(ScriptedTask.objects.values_list("status", flat=True)))
    return {"rows": rows, "after": after, "tasks": dict(tasks), "alive": server.alive()}


COLUMNS = ["t s", "RSS MB", "fds", "conns", "open", "stream", "resume", "history", "status", "bad",
           "idle", "idle cut/left", "events", "5xx", "conn errors", "/health ok/fail", "p50 ms",
           "p99 ms"]  # fmt: skip


def print_header() -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("| " + " | ".join("---:" for _ in COLUMNS) + " |", flush=True)


def print_row(row: dict) -> None:
    stats, health = row.get("stats", {}), row.get("health")
    kinds = [stats.get(k, 0) for k in MIX]
    cells = [
        row["t"], fmt_mb(row["rss_kb"]), row["fds"], sum(kinds), row.get("open", "-"), *kinds,
        f"{stats.get('idle cut', 0)}/{stats.get('idle left', 0)}", stats.get("events", 0),
        stats.get("5xx", 0),
        sum(row.get("errors", {}).values()),
        f"{health['ok']}/{health['failed']}" if health else "-",
        fmt_ms(health["p50_s"]) if health else "-", fmt_ms(health["p99_s"]) if health else "-",
    ]  # fmt: skip
    print("| " + " | ".join(f"{c:,}" if isinstance(c, int) else str(c) for c in cells) + " |", flush=True)


def summary(result: dict, args) -> list[tuple[str, str]]:
    rows = result["rows"]
    rss = [r["rss_kb"] for r in rows if r["rss_kb"]]
    half = [r for r in rows if r["t"] >= args.minutes * 30 and r["rss_kb"]]
    slope = None
    if len(half) >= 2:
        ts, ys = [r["t"] / 60 for r in half], [r["rss_kb"] / 1024 for r in half]
        mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
        slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / sum((t - mt) ** 2 for t in ts)
    totals: Counter = Counter()
    errors: Counter = Counter()
    statuses: Counter = Counter()
    latencies_p99 = []
    for r in rows[1:]:
        totals.update(r["stats"])
        errors.update(r["errors"])
        statuses.update(r["statuses"])
        if r["health"]["p99_s"] is not None:
            latencies_p99.append(r["health"]["p99_s"])
    health_ok = sum(r["health"]["ok"] for r in rows[1:])
    health_failed = sum(r["health"]["failed"] for r in rows[1:])
    conns = sum(totals[k] for k in MIX)
    server_errors = [e for r in rows[1:] for e in r.get("server_errors", [])]
    return [
        ("server RSS MB: start / end / max / 5 s after the load",
         f"{fmt_mb(rss[0])} / {fmt_mb(rss[-1])} / {fmt_mb(max(rss))} / "
         f"{fmt_mb(result['after']['rss_kb'])}"),
        ("RSS slope over the second half", "-" if slope is None else f"{slope:+.2f} MB/min"),
        ("server fds: start / end / 5 s after the load",
         f"{rows[0]['fds']} / {rows[-1]['fds']} / {result['after']['fds']}"),
        ("connections", f"{conns:,} ({', '.join(f'{k} {totals[k]:,}' for k in MIX)})"),
        ("events received", f"{totals['events']:,}"),
        ("answers", ", ".join(f"{k} x{v:,}" for k, v in sorted(statuses.items()))),
        ("5xx", f"{totals['5xx']:,}" + (f" (e.g. {server_errors[0]})" if server_errors else "")),
        ("bad requests not answered 4xx", f"{totals['bad_not_4xx']:,}"),
        ("idle sockets cut by the server / left by the client",
         f"{totals['idle cut']:,} / {totals['idle left']:,}"),
        ("connection errors", ", ".join(f"{k} x{v:,}" for k, v in errors.most_common()) or "0"),
        ("/health ok / failed; worst interval p99", f"{health_ok:,} / {health_failed:,}; "
         f"{fmt_ms(max(latencies_p99) if latencies_p99 else None)} ms"),
        ("tasks by status at the end", ", ".join(f"{k} {v}" for k, v in sorted(result["tasks"].items()))),
        ("server alive at the end", str(result["alive"])),
    ]  # fmt: skip


def main():
    if sys.argv[1:2] == ["_worker"]:
        return worker_main(sys.argv[3])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--rate", type=float, default=60, help="new connections a second (60)")
    parser.add_argument("--interval", type=float, default=10, help="seconds per row (10)")
    parser.add_argument("--task-every", type=float, default=2, help="a new running task every N s (2)")
    parser.add_argument("--steps", type=int, default=60, help="events of a running task (60)")
    parser.add_argument("--delay", type=float, default=0.25, help="seconds between its events (0.25)")
    parser.add_argument("--finished", type=int, default=20, help="finished tasks made up front (20)")
    parser.add_argument("--finished-events", type=int, default=300, help="events of each (300)")
    parser.add_argument("--idle-hold", type=float, default=30, help="an idle socket leaves after N s (30)")
    parser.add_argument("--tree", default=str(REPO), help="checkout whose server runs (default: this one)")
    parser.add_argument("--env", action="append", metavar="KEY=VALUE", help="server environment (repeatable)")
    parser.add_argument("--server-nofile", type=int, default=20000)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    database_url = setup_django(tree, "soak")
    server = ServerProc(tree, database_url, env=parse_env(args.env), nofile=args.server_nofile, name="soak")
    print(f"tree: {tree} ({tree_commit(tree)}); {args.minutes:g} min at {args.rate:g} connections/s; "
          f"env: {parse_env(args.env) or '-'}", flush=True)  # fmt: skip
    try:
        result = asyncio.run(soak(args, server))
    finally:
        server.stop()
    print(
        f"\n### Soak {args.label}: {args.minutes:g} min, {args.rate:g} connections/s — {tree_commit(tree)}\n"
    )
    print("| figure | value |\n| --- | --- |")
    for name, value in summary(result, args):
        print(f"| {name} | {value} |")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"tree": str(tree), "commit": tree_commit(tree), "args": vars(args), **result},
                               indent=2, default=str))  # fmt: skip
    print(f"\nresults: {path}\nserver log: {server.log_path}")


if __name__ == "__main__":
    main()
