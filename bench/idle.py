"""Idle streams: server memory per open stream, and one event to all of them.

    poetry run python bench/idle.py [--streams 1000,10000]

N raw-socket streams (a separate process) wait on one task that has not
started; the server's RSS is read before and after they connect. Then the
task sends one event (and completes): the time from send_event to the last
stream receiving it. The same for the raw-asyncio ceiling server. Prints a
table and writes bench/results/idle-*.json.
"""

import argparse
import time

from common import Ceiling, Server, load, machine, save, setup_django


def measure(server, path, streams, start):
    before = server.rss_kb()
    connected = {}

    def start_and_measure():
        time.sleep(1.0)  # let allocations settle after the last connection
        connected["rss_kb"] = server.rss_kb()
        start()

    result = load(
        server.port, path, connections=streams, expect=1, start=start_and_measure,
        latency_sample=streams,
    )  # fmt: skip
    result["rss_before_kb"] = before
    result["rss_connected_kb"] = connected["rss_kb"]
    result["kb_per_stream"] = (connected["rss_kb"] - before) / streams
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1000,10000")
    args = parser.parse_args()
    setup_django()
    from streaming.tests.testapp.models import ScriptedTask

    rows = []
    for streams in [int(s) for s in args.streams.split(",")]:
        roof = Ceiling()
        try:
            ceiling = measure(roof, "/stream", streams, lambda roof=roof: roof.start(1))
        finally:
            roof.stop()
        server = Server()
        try:
            task = ScriptedTask.objects.create(steps=1, status="created")
            ours = measure(server, f"/stream/testapp/ScriptedTask/{task.pk}", streams, task.start)
        finally:
            server.stop()
        rows.append({"streams": streams, "ceiling": ceiling, "ours": ours})
        print(f"N={streams}: ours {ours['kb_per_stream']:.1f} KB/stream, ceiling "
              f"{ceiling['kb_per_stream']:.1f} KB/stream", flush=True)  # fmt: skip

    print()
    print("| streams | ours KB/stream | ceiling KB/stream | ratio | ours: one event to all (ms) "
          "| ceiling (ms) | ratio | complete |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        o, c = row["ours"], row["ceiling"]
        o_ms, c_ms = o["latency_ms"]["max"], c["latency_ms"]["max"]
        print(
            f"| {row['streams']:,} | {o['kb_per_stream']:.1f} | {c['kb_per_stream']:.1f} | "
            f"{o['kb_per_stream'] / c['kb_per_stream']:.1f} | {o_ms:.0f} | {c_ms:.0f} | "
            f"{o_ms / c_ms:.1f} | {o['complete'] and c['complete']} |"
        )
    path = save("idle", {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
