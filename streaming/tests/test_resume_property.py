"""Property: a client that disconnects and resumes with its last id gets every event once, in order."""

import asyncio
import contextlib
import dataclasses
from bisect import bisect_right
from datetime import UTC, datetime
from itertools import cycle

from django.test import SimpleTestCase
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.conf import StreamingSettings
from streaming.events import KEEPALIVE, TERMINAL_TYPES, Event, build_payload
from streaming.fanout.hub import Hub
from streaming.keys import TaskKey
from streaming.transports.local import LocalTransport

KEY = TaskKey("demo.exampletask", "1")
STAMP = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
NON_TERMINAL = ["progress", "log", "retry", "step.done", "a.b:c-d_1"]


class FakeHistory:
    """Every published event, as the event log holds them; reads may yield to the loop."""

    def __init__(self, switches: int):
        self.events: list[Event] = []
        self.switches = switches

    def add(self, event: Event) -> None:
        assert not self.events or self.events[-1].seq < event.seq
        self.events.append(event)

    async def _yield(self):
        for _ in range(self.switches):
            await asyncio.sleep(0)

    async def read(self, key, after, limit):
        assert key == KEY
        await self._yield()
        start = bisect_right(self.events, after, key=lambda e: e.seq)
        return self.events[start : start + limit]

    async def last(self, key):
        assert key == KEY
        await self._yield()
        return self.events[-1] if self.events else None


def seqs_of(chunk: bytes) -> list[int]:
    return [int(line[4:]) for line in chunk.split(b"\n") if line.startswith(b"id: ")]


json_values = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=12))


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 60))
    types = [*draw(st.lists(st.sampled_from(NON_TERMINAL), min_size=n - 1, max_size=n - 1))]
    types.append(draw(st.sampled_from(sorted(TERMINAL_TYPES))))
    payloads = draw(
        st.lists(
            st.dictionaries(st.text(min_size=1, max_size=6), json_values, max_size=3),
            min_size=n,
            max_size=n,
        )
    )
    events = [
        Event(seq, event_type, build_payload(data, task_id=1, model_name="ExampleTask", timestamp=STAMP))
        for seq, (event_type, data) in enumerate(zip(types, payloads, strict=True), start=1)
    ]
    return {
        "events": events,
        "history_size": draw(st.integers(1, 20)),
        "max_chunk": draw(st.sampled_from([1, 150, 600, 256 * 1024])),
        # published before the first subscribe; the rest in bursts while the client reads
        "before": draw(st.integers(0, n)),
        "bursts": draw(st.lists(st.integers(1, 10), min_size=1, max_size=10)),
        # loop turns the client lets pass after each chunk (it lags behind the publisher)
        "pauses": draw(st.lists(st.integers(0, 5), min_size=1, max_size=10)),
        # the client disconnects once it has received this many events, for each cut
        "cuts": sorted(set(draw(st.lists(st.integers(1, n), max_size=10)))),
        "switches": draw(st.integers(1, 3)),  # a real read always yields at least once
    }


async def run_scenario(scenario) -> tuple[list[int], int, dict]:
    events: list[Event] = scenario["events"]
    history = FakeHistory(scenario["switches"])
    broker = Hub(
        transport=LocalTransport(),
        history=history,
        settings=dataclasses.replace(
            StreamingSettings(),
            HISTORY_SIZE=scenario["history_size"],
            KEEPALIVE_INTERVAL=60.0,
            MAX_CHUNK_BYTES=scenario["max_chunk"],
        ),
    )
    by_seq = {e.seq: e for e in events}

    async def publish(batch):
        for event in batch:
            await broker.publish(KEY, event)
            history.add(event)

    async def publisher(start):
        position = start
        for size in cycle(scenario["bursts"]):
            if position >= len(events):
                return
            await publish(events[position : position + size])
            position += size
            await asyncio.sleep(0)

    async def client():
        received: list[int] = []
        cuts = iter(scenario["cuts"])
        next_cut = next(cuts, None)
        pauses = cycle(scenario["pauses"])
        connections = 0
        after = 0
        while True:
            connections += 1
            async with contextlib.aclosing(broker.subscribe(KEY, after)) as sub:
                async for chunk in sub:
                    if chunk == KEEPALIVE:
                        continue
                    seqs = seqs_of(chunk)
                    assert seqs, chunk
                    # a chunk is whole encoded events, byte for byte
                    assert chunk == b"".join(by_seq[s].sse for s in seqs), chunk
                    received += seqs
                    if by_seq[seqs[-1]].terminal:
                        return received, connections
                    for _ in range(next(pauses)):
                        await asyncio.sleep(0)
                    if next_cut is not None and len(received) >= next_cut:
                        while next_cut is not None and next_cut <= len(received):
                            next_cut = next(cuts, None)
                        break  # disconnect: aclosing() closes the generator
                else:
                    raise AssertionError(f"the stream ended before the terminal event: {received}")
            after = received[-1]

    await publish(events[: scenario["before"]])
    async with asyncio.timeout(5):
        client_task = asyncio.create_task(client())
        await asyncio.sleep(0)
        await publisher(scenario["before"])
        received, connections = await client_task
    return received, connections, dict(broker._channels)


class ResumePropertyTests(SimpleTestCase):
    @settings(max_examples=200, deadline=None, database=None)
    @given(scenarios())
    def test_resuming_client_gets_every_event_once_in_order(self, scenario):
        received, connections, channels_left = asyncio.run(run_scenario(scenario))
        n = len(scenario["events"])
        self.assertEqual(received, list(range(1, n + 1)))
        self.assertLessEqual(connections, len(scenario["cuts"]) + 1)
        self.assertEqual(channels_left, {})  # the finished task left nothing in memory
