"""The ceiling: a minimal raw-asyncio SSE broadcast server (no framework, no database).

    python bench/ceiling.py --port 9000

Any GET opens a stream. ``GET /start?events=K&delay=D`` (on a fresh
connection) makes it broadcast K events then a ``complete`` event, D seconds
apart (0: as fast as a task could, yielding to the loop between events): each
event is encoded once and the same bytes are written to every transport. It
is the physical limit for Python on this machine; bench/fanout.py reports
every other figure as a ratio to it, measured in the same run.
"""

import argparse
import asyncio
import json
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

HEADERS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Broadcast:
    def __init__(self):
        self.transports: set[asyncio.Transport] = set()

    async def run(self, events: int, delay: float, payload: int) -> None:
        filler = "x" * payload
        for seq in range(1, events + 2):
            kind = "complete" if seq == events + 1 else "step"
            body = json.dumps({"step": seq, "filler": filler, "_timestamp": datetime.now(UTC).isoformat()})
            data = chunk(f"event: {kind}\ndata: {body}\nid: {seq}\n\n".encode())
            for transport in self.transports:
                transport.write(data)
            await asyncio.sleep(delay)


class StreamProtocol(asyncio.Protocol):
    def __init__(self, broadcast: Broadcast):
        self.broadcast = broadcast
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        target = self.buffer.split(b" ", 2)[1].decode()
        url = urlsplit(target)
        if url.path == "/start":
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            asyncio.get_running_loop().create_task(
                self.broadcast.run(
                    int(query.get("events", 1000)),
                    float(query.get("delay", 0)),
                    int(query.get("payload", 100)),
                )
            )
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            self.transport.close()
            return
        if url.path == "/health":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nOK")
            return
        self.transport.write(HEADERS)
        self.broadcast.transports.add(self.transport)

    def connection_lost(self, exc):
        self.broadcast.transports.discard(self.transport)


async def main(port: int) -> None:
    broadcast = Broadcast()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StreamProtocol(broadcast), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(main(args.port))
