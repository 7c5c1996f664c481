"""Scale-out: fanout through the Redis broker with 1, 2 and 4 server processes,
against one process with the in-memory broker, in one run.

    poetry run python bench/scaleout.py [--watchers 1000] [--events 1000] [--rate 20]

Needs Redis at 127.0.0.1:6379 (uses database 9 and empties it). One task sends
--events events as fast as it can (then at --rate events/s); --watchers clients
watch it through raw sockets from a separate process. Prints a table and writes
bench/results/scaleout-*.json.
"""

import argparse
import time

from common import Server, load, machine, save, setup_django

REDIS_URL = "redis://127.0.0.1:6379/9"


def measure(server, *, watchers, events, delay, payload=100):
    from streaming.tests.testapp.models import ScriptedTask

    task = ScriptedTask.objects.create(steps=events, delay=delay, payload_size=payload, status="created")
    result = load(
        server.port,
        f"/stream/testapp/ScriptedTask/{task.pk}",
        connections=watchers,
        expect=events + 1,
        start=task.start,
    )
    result["rss_kb"] = server.rss_kb()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--rate-events", type=int, default=100)
    args = parser.parse_args()
    setup_django()
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    configs = [("memory, 1 process", 1, None)] + [
        (f"redis, {n} process{'es' if n > 1 else ''}", n, REDIS_URL) for n in (1, 2, 4)
    ]
    rows = []
    for name, workers, broker in configs:
        server = Server(workers=workers, broker_url=broker)
        try:
            fast = measure(server, watchers=args.watchers, events=args.events, delay=0)
            time.sleep(1)
            paced = measure(server, watchers=args.watchers, events=args.rate_events, delay=1 / args.rate)
        finally:
            server.stop()
        rows.append({"config": name, "workers": workers, "fast": fast, "paced": paced})
        print(f"{name}: {fast['events_per_s']:.0f} events/s, p99 {paced['latency_ms']['p99']:.1f} ms",
              flush=True)  # fmt: skip

    base = rows[0]
    print()
    print(f"{args.watchers} watchers of one task; fast: {args.events} events as fast as sent; "
          f"paced: {args.rate_events} events at {args.rate:g}/s")  # fmt: skip
    print(
        "| config | events/s delivered | vs memory | p50 ms (fast) | p99 ms (paced) | vs memory | complete |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        fast, paced = row["fast"], row["paced"]
        print(
            f"| {row['config']} | {fast['events_per_s']:,.0f} | "
            f"{fast['events_per_s'] / base['fast']['events_per_s']:.2f} | "
            f"{fast['latency_ms']['p50']:.1f} | {paced['latency_ms']['p99']:.1f} | "
            f"{paced['latency_ms']['p99'] / base['paced']['latency_ms']['p99']:.2f} | "
            f"{fast['complete'] and paced['complete']} |"
        )
    path = save("scaleout", {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
