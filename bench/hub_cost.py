"""The local fanout's cost per event, in instructions (valgrind callgrind): repeatable on a noisy machine.

    poetry run python bench/hub_cost.py [--sinks 200] [--events 1000] [--tree PATH]

Runs a hub in process with ``--sinks`` in-memory sinks (no sockets, no
database) and publishes ``--events`` events, one flush each, under
callgrind; the same with no event gives the fixed cost, and the difference
divided by the events is what one event costs the hub. ``--tree`` measures
another checkout of the project (e.g. a commit before a change), so two
versions compare exactly, whatever else the machine is doing.
"""

import argparse
import asyncio
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class History:
    async def read(self, *args):
        return []

    async def last(self, *args):
        return None


class Sink:
    __slots__ = ("paused", "writes")

    def __init__(self):
        self.paused = False
        self.writes = 0

    def write(self, data):
        self.writes += 1

    async def drain(self):
        pass

    def end(self):
        pass

    def abort(self):
        pass


async def publish(sinks: int, events: int) -> None:
    from streaming.conf import StreamingSettings
    from streaming.events import Event

    settings = dataclasses.replace(StreamingSettings(), KEEPALIVE_INTERVAL=3600)
    try:
        from streaming.fanout.hub import Hub
        from streaming.keys import TaskKey
        from streaming.transports.local import LocalTransport

        transport = LocalTransport()
        hub = Hub(transport=transport, history=History(), settings=settings)
        transport.bind(hub, on_wake=lambda: None)
        key = TaskKey("testapp.scriptedtask", "1")
    except ImportError:  # a checkout from before the hub/transport split
        from streaming.broker.memory import MemoryBroker

        hub = MemoryBroker(history=History(), settings=settings)
        key = "testapp.scriptedtask:1"
    outs = [Sink() for _ in range(sinks)]
    subs = [hub.attach(key, 0, sink) for sink in outs]
    while any(sub.task is not None for sub in subs):  # noqa: ASYNC110 - until every one is live
        await asyncio.sleep(0)
    payload = json.dumps({"step": 1, "filler": "x" * 100})
    for seq in range(1, events + 1):
        await hub.publish(key, Event(seq, "step", payload))
        await asyncio.sleep(0)  # one flush per event
    await asyncio.sleep(0)
    assert all(sink.writes == events for sink in outs)


def instructions(tree: Path, sinks: int, events: int) -> int:
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--child", "--tree", str(tree), "--sinks", str(sinks), "--events", str(events)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(re.search(r"Collected : (\d+)", run.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sinks", type=int, default=200)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--tree", type=Path, default=REPO)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(args.tree))
        asyncio.run(publish(args.sinks, args.events))
        return
    fixed = instructions(args.tree, args.sinks, 0)
    total = instructions(args.tree, args.sinks, args.events)
    per_event = (total - fixed) / args.events
    print(f"tree: {args.tree}")
    print("| sinks | events | instructions per event | per sink write |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {args.sinks} | {args.events:,} | {per_event:,.0f} | {per_event / args.sinks:,.0f} |")


if __name__ == "__main__":
    main()
