"""Start latency: another process starts a task; how soon does a watcher see its first event?

    poetry run python bench/start_latency.py [--tasks 50]

A watcher is connected to each of --tasks tasks created unstarted; a separate
process (manage.py shell) starts them one by one, 100 ms apart, printing the
wall-clock time right after each commit. Latency = first event received - commit.
Embedded default: SQLite, in-memory broker. Writes bench/results/start_latency-*.json.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time

from common import DATABASE_URL, REPO, Server, machine, save, setup_django

STARTER = """
import os, time
from streaming.tests.testapp.models import ScriptedTask
for pk in os.environ["BENCH_PKS"].split():
    ScriptedTask.objects.filter(pk=int(pk), status="created").update(status="pending")
    print(pk, time.time(), flush=True)
    time.sleep(0.1)
"""


async def watch(port, pk, received, connected, all_connected):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /stream/testapp/ScriptedTask/{pk} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    connected.add(pk)
    if len(connected) == all_connected[1]:
        all_connected[0].set()
    data = b""
    while b"\nid: " not in data:
        data += await reader.read(65536)
    received[pk] = time.time()
    writer.close()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run(server, pks):
    received, connected = {}, set()
    all_connected = (asyncio.Event(), len(pks))
    watchers = [asyncio.create_task(watch(server.port, pk, received, connected, all_connected)) for pk in pks]
    await all_connected[0].wait()
    env = dict(os.environ, DATABASE_URL=DATABASE_URL, BENCH_PKS=" ".join(map(str, pks)))
    starter = await asyncio.create_subprocess_exec(
        sys.executable, "manage.py", "shell", "-c", STARTER,
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    committed = {}
    async for line in starter.stdout:
        fields = line.decode().split()
        if len(fields) == 2 and fields[0].isdigit():  # not the shell's own chatter
            committed[int(fields[0])] = float(fields[1])
    await starter.wait()
    await asyncio.wait_for(asyncio.gather(*watchers), 30)
    return [(received[pk] - committed[pk]) * 1000 for pk in pks]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=50)
    args = parser.parse_args()
    setup_django()
    from streaming.tests.testapp.models import ScriptedTask

    server = Server()
    try:
        pks = [ScriptedTask.objects.create(steps=1, status="created").pk for _ in range(args.tasks)]
        latencies = asyncio.run(run(server, pks))
    finally:
        server.stop()
    result = {
        "tasks": args.tasks,
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "latencies_ms": latencies,
    }
    print(f"start latency over {args.tasks} tasks: p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms")  # fmt: skip
    path = save("start_latency", {"machine": machine(), "result": result})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
