"""SSE load client: many raw-socket connections to one stream, in its own process.

    python bench/loadclient.py --port 8888 --path /stream/testapp/ScriptedTask/1 \\
        --connections 1000 --expect 1001

Opens the connections (Last-Event-ID: 0), prints READY once all have their
response headers, then reads until every connection has ``--expect`` events
(or --timeout) and prints one JSON line: events delivered, the span from the
first to the last event received, and latency from each event's
``_timestamp`` (set by send_event) to its receipt, sampled on
``--latency-sample`` connections so that parsing does not slow the client.
"""

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime

TIMESTAMP = b'"_timestamp": "'


class StreamCounter(asyncio.Protocol):
    def __init__(self, run, measure_latency: bool):
        self.run = run
        self.measure = measure_latency
        self.headers_done = False
        self.buffer = b""
        self.tail = b""
        self.events = 0
        self.done = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        now = time.time()
        if not self.headers_done:
            head, sep, data = data.partition(b"\r\n\r\n")
            if not sep:
                return
            self.headers_done = True
            if not head.startswith(b"HTTP/1.1 200 "):  # refused (a limit, an error): counted, said
                self.run.refused.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            self.run.headers_seen()
        # An "\nid: " split across two reads still counts once: look at the
        # last 4 bytes of the previous read too (too short to hold a whole one).
        count = (self.tail + data).count(b"\nid: ")
        self.tail = data[-4:]
        if not count:
            return
        if self.run.first is None:
            self.run.first = now
        self.run.last = now
        self.events += count
        self.run.delivered += count
        if self.measure:
            self.buffer += data
            start = 0
            while (i := self.buffer.find(TIMESTAMP, start)) != -1:
                end = self.buffer.find(b'"', i + len(TIMESTAMP))
                if end == -1:
                    break
                stamp = self.buffer[i + len(TIMESTAMP) : end].decode()
                self.run.latencies.append(now - datetime.fromisoformat(stamp).timestamp())
                start = end
            self.buffer = self.buffer[start:]
        if self.events >= self.run.expect and not self.done:
            self.done = True
            self.run.reached += 1
            self.run.finished()

    def connection_lost(self, exc):
        if not self.done:
            self.done = True
            self.run.lost += 1
            self.run.finished()


class Run:
    def __init__(self, connections: int, expect: int):
        self.connections = connections
        self.expect = expect
        self.delivered = 0
        self.latencies: list[float] = []
        self.first = None
        self.last = None
        self.lost = 0
        self.reached = 0
        self.refused: list[str] = []
        self._headers = 0
        self._finished = 0
        self.all_headers = asyncio.Event()
        self.all_finished = asyncio.Event()

    def headers_seen(self):
        self._headers += 1
        if self._headers == self.connections:
            self.all_headers.set()

    def finished(self):
        self._finished += 1
        if self._finished == self.connections:
            self.all_finished.set()


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def main(args):
    loop = asyncio.get_running_loop()
    run = Run(args.connections, args.expect)
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nLast-Event-ID: 0\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    transports = []
    for i in range(args.connections):
        transport, _ = await loop.create_connection(
            lambda i=i: StreamCounter(run, i < args.latency_sample), args.host, args.port
        )
        transport.write(request)
        transports.append(transport)
    await asyncio.wait_for(run.all_headers.wait(), 60)
    print("READY", flush=True)
    try:
        await asyncio.wait_for(run.all_finished.wait(), args.timeout)
        timed_out = False
    except TimeoutError:
        timed_out = True
    for transport in transports:
        transport.close()
    span = (run.last - run.first) if run.first and run.last else None
    latencies_ms = [x * 1000 for x in run.latencies]
    print(
        json.dumps(
            {
                "connections": args.connections,
                "expected_per_connection": args.expect,
                "delivered": run.delivered,
                # every connection got at least --expect events (one read may bring more)
                "complete": run.reached == args.connections and not timed_out,
                "lost_connections": run.lost,
                "refused": len(run.refused),
                "refused_first": run.refused[0] if run.refused else None,
                "span_s": span,
                "events_per_s": run.delivered / span if span else None,
                "latency_ms": {
                    "samples": len(latencies_ms),
                    "p50": percentile(latencies_ms, 0.50),
                    "p99": percentile(latencies_ms, 0.99),
                    "max": max(latencies_ms) if latencies_ms else None,
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--expect", type=int, required=True, help="events per connection")
    parser.add_argument("--latency-sample", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=120)
    arguments = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main(arguments)))
