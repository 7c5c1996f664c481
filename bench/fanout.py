"""Fanout: one task, C watchers, against the raw-asyncio ceiling in the same run.

    poetry run python bench/fanout.py [--watchers 100,1000,5000] [--events 1000]

For each C: the ceiling server and our server (embedded default: one
process, SQLite, in-memory broker) each broadcast K events as fast as the
sender can to C raw-socket watchers (a separate process); at C=1,000 also
with the event log off (EphemeralTask), and at 5 events/s for latency.
Prints a table with every figure's ratio to the ceiling and writes
bench/results/fanout-*.json.
"""

import argparse

from common import Ceiling, Server, load, machine, save, setup_django


def sample(watchers, delay):
    # Paced runs time every watcher (few events); fast runs sample 50 of them.
    return watchers if delay else 50


def ours(server, model, *, watchers, events, delay, payload=100):
    task = model.objects.create(steps=events, delay=delay, payload_size=payload, status="created")
    path = f"/stream/testapp/{model.__name__}/{task.pk}"
    return load(
        server.port, path, connections=watchers, expect=events + 1, start=task.start,
        latency_sample=sample(watchers, delay),
    )  # fmt: skip


def ceiling(server, *, watchers, events, delay, payload=100):
    return load(
        server.port, "/stream", connections=watchers, expect=events + 1,
        start=lambda: server.start(events, delay, payload), latency_sample=sample(watchers, delay),
    )  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", default="100,1000,5000")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--paced-events", type=int, default=20)
    parser.add_argument("--rate", type=float, default=5)
    args = parser.parse_args()
    setup_django()
    from streaming.tests.testapp.models import EphemeralTask, ScriptedTask

    rows = []
    roof, server = Ceiling(), Server()
    try:
        for watchers in [int(w) for w in args.watchers.split(",")]:
            events = args.events if watchers <= 1000 else max(100, args.events // 5)
            row = {"watchers": watchers, "events": events}
            row["ceiling"] = ceiling(roof, watchers=watchers, events=events, delay=0)
            row["ours"] = ours(server, ScriptedTask, watchers=watchers, events=events, delay=0)
            if watchers == 1000:
                row["ours_log_off"] = ours(server, EphemeralTask, watchers=watchers, events=events, delay=0)
                delay = 1 / args.rate
                row["paced_ceiling"] = ceiling(roof, watchers=watchers, events=args.paced_events, delay=delay)
                row["paced_ours"] = ours(
                    server, ScriptedTask, watchers=watchers, events=args.paced_events, delay=delay
                )
            row["rss_kb"] = {"ceiling": roof.rss_kb(), "ours": server.rss_kb()}
            rows.append(row)
            print(
                f"C={watchers}: ceiling {row['ceiling']['events_per_s']:,.0f}/s, "
                f"ours {row['ours']['events_per_s']:,.0f}/s",
                flush=True,
            )
    finally:
        roof.stop()
        server.stop()

    print()
    print("| watchers | events | ceiling events/s | ours events/s | ours / ceiling | complete |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        c, o = row["ceiling"], row["ours"]
        print(
            f"| {row['watchers']:,} | {row['events']:,} | {c['events_per_s']:,.0f} | "
            f"{o['events_per_s']:,.0f} | {o['events_per_s'] / c['events_per_s']:.2f} | "
            f"{c['complete'] and o['complete']} |"
        )
    for row in rows:
        if "paced_ours" in row:
            c, o = row["paced_ceiling"]["latency_ms"], row["paced_ours"]["latency_ms"]
            off = row["ours_log_off"]
            print()
            print(f"1,000 watchers, {args.paced_events} events at {args.rate:g}/s, send to receipt:")
            print("| server | p50 ms | p99 ms | max ms | p99 / ceiling |")
            print("| --- | ---: | ---: | ---: | ---: |")
            print(f"| ceiling | {c['p50']:.1f} | {c['p99']:.1f} | {c['max']:.1f} | 1.00 |")
            print(f"| ours | {o['p50']:.1f} | {o['p99']:.1f} | {o['max']:.1f} | {o['p99'] / c['p99']:.2f} |")
            print()
            print(
                f"Event log on vs off at 1,000 watchers: {row['ours']['events_per_s']:,.0f} vs "
                f"{off['events_per_s']:,.0f} events/s "
                f"(on / off = {row['ours']['events_per_s'] / off['events_per_s']:.2f})"
            )
    path = save("fanout", {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
