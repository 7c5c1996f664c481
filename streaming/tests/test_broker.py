"""Unit tests of the local fanout hub (in-process transport), with a fake event log and no database."""

import asyncio
import contextlib
import dataclasses
import json
import time
import unittest
from bisect import bisect_right

from streaming.conf import StreamingSettings
from streaming.events import KEEPALIVE, Event, retry_hint
from streaming.fanout.hub import RECONNECT_HINT_MS, Hub
from streaming.keys import TaskKey
from streaming.transports.local import LocalTransport

KEY = TaskKey("demo.exampletask", "1")
WAIT = 2.0  # the bound on any single wait in these tests


def make_settings(history_size=1000, keepalive=60.0, max_chunk=256 * 1024):
    return dataclasses.replace(
        StreamingSettings(),
        HISTORY_SIZE=history_size,
        KEEPALIVE_INTERVAL=keepalive,
        MAX_CHUNK_BYTES=max_chunk,
    )


def ev(seq: int, event_type: str = "progress", **data) -> Event:
    return Event(seq, event_type, json.dumps({"n": seq, **data}))


def seqs_of(chunk: bytes) -> list[int]:
    return [int(line[4:]) for line in chunk.split(b"\n") if line.startswith(b"id: ")]


class FakeHistory:
    """The event log over a plain dict: key -> events sorted by seq."""

    def __init__(self):
        self.events: dict[TaskKey, list[Event]] = {}
        self.reads: list[tuple[TaskKey, int, int]] = []
        self.lasts: list[TaskKey] = []

    def add(self, key: TaskKey, *events: Event) -> None:
        stored = self.events.setdefault(key, [])
        for event in events:
            if stored and stored[-1].seq >= event.seq:
                raise AssertionError(f"history of {key}: seq {event.seq} after {stored[-1].seq}")
            stored.append(event)

    async def read(self, key, after, limit):
        self.reads.append((key, after, limit))
        await asyncio.sleep(0)  # a database read yields to the loop (and lets timeouts fire)
        stored = self.events.get(key, [])
        start = bisect_right(stored, after, key=lambda e: e.seq)
        return stored[start : start + limit]

    async def last(self, key):
        self.lasts.append(key)
        await asyncio.sleep(0)
        stored = self.events.get(key, [])
        return stored[-1] if stored else None


class BrokerTestCase(unittest.IsolatedAsyncioTestCase):
    def make(self, running=None, **settings) -> Hub:
        self.history = FakeHistory()
        self.transport = LocalTransport()
        config = make_settings(**settings)
        self.broker = Hub(transport=self.transport, history=self.history, settings=config, running=running)
        self.transport.bind(self.broker, on_wake=lambda: None)
        return self.broker

    async def publish(self, *events: Event, key: TaskKey = KEY, persist: bool = True) -> None:
        """As the runner does: publish, and (when persisted) the event is in the log."""
        for event in events:
            await self.broker.publish(key, event)
            if persist:
                self.history.add(key, event)

    async def next_chunk(self, sub, timeout: float = WAIT) -> bytes:
        async with asyncio.timeout(timeout):
            return await anext(sub)

    async def read_to_end(self, sub, timeout: float = WAIT) -> list[bytes]:
        chunks = []
        async with asyncio.timeout(timeout):
            async for chunk in sub:
                chunks.append(chunk)
        return chunks

    async def assert_ended(self, sub):
        with self.assertRaises(StopAsyncIteration):
            await self.next_chunk(sub)


class SubscribeTests(BrokerTestCase):
    async def test_after_none_starts_with_latest_event_then_live(self):
        self.make()
        await self.publish(*(ev(i) for i in range(1, 6)))
        async with contextlib.aclosing(self.broker.subscribe(KEY, None)) as sub:
            self.assertEqual(await self.next_chunk(sub), ev(5).sse)
            await self.publish(ev(6), ev(7))
            self.assertEqual(await self.next_chunk(sub), ev(6).sse + ev(7).sse)
            await self.publish(ev(8, "complete"))
            self.assertEqual(await self.next_chunk(sub), ev(8, "complete").sse)
            await self.assert_ended(sub)

    async def test_after_none_on_pending_task_waits_for_first_event(self):
        self.make()
        async with contextlib.aclosing(self.broker.subscribe(KEY, None)) as sub:
            reader = asyncio.create_task(self.next_chunk(sub))
            await asyncio.sleep(0.01)
            self.assertFalse(reader.done())
            await self.publish(ev(1))
            self.assertEqual(await reader, ev(1).sse)

    async def test_after_n_yields_following_events_in_order(self):
        self.make()
        await self.publish(*(ev(i) for i in range(1, 11)))
        async with contextlib.aclosing(self.broker.subscribe(KEY, 4)) as sub:
            chunk = await self.next_chunk(sub)
            self.assertEqual(chunk, b"".join(ev(i).sse for i in range(5, 11)))
            await self.publish(ev(11, "complete"))
            self.assertEqual(await self.read_to_end(sub), [ev(11, "complete").sse])

    async def test_after_latest_waits_for_next(self):
        self.make()
        await self.publish(ev(1), ev(2))
        async with contextlib.aclosing(self.broker.subscribe(KEY, 2)) as sub:
            reader = asyncio.create_task(self.next_chunk(sub))
            await asyncio.sleep(0.01)
            self.assertFalse(reader.done())
            await self.publish(ev(3))
            self.assertEqual(await reader, ev(3).sse)

    async def test_ends_after_each_terminal_type(self):
        for terminal in ("complete", "error", "cancelled"):
            with self.subTest(terminal=terminal):
                self.make()
                async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
                    self.assertNotIn(KEY, self.broker._channels)  # the body has not started yet
                    reader = asyncio.create_task(self.read_to_end(sub))
                    await asyncio.sleep(0)
                    await self.publish(ev(1), ev(2, "retry"))
                    await asyncio.sleep(0)
                    await self.publish(ev(3, terminal))
                    chunks = await reader
                self.assertEqual(b"".join(chunks), ev(1).sse + ev(2, "retry").sse + ev(3, terminal).sse)
                self.assertEqual([s for c in chunks for s in seqs_of(c)], [1, 2, 3])

    async def test_retry_event_does_not_end_subscription(self):
        self.make()
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            await self.publish(ev(1, "retry"))
            self.assertEqual(await self.next_chunk(sub), ev(1, "retry").sse)
            await self.publish(ev(2))
            self.assertEqual(await self.next_chunk(sub), ev(2).sse)

    async def test_every_subscriber_gets_the_same_bytes(self):
        self.make()
        subs = [self.broker.subscribe(KEY, 0) for _ in range(3)]
        readers = [asyncio.create_task(self.read_to_end(s)) for s in subs]
        await asyncio.sleep(0)
        for i in range(1, 5):
            await self.publish(ev(i))
            await asyncio.sleep(0)
        await self.publish(ev(5, "complete"))
        results = [b"".join(await r) for r in readers]
        expected = b"".join(ev(i).sse for i in range(1, 5)) + ev(5, "complete").sse
        self.assertEqual(results, [expected] * 3)


class HistoryTests(BrokerTestCase):
    def finished_task(self, n=7):
        self.make()
        self.history.add(KEY, *(ev(i) for i in range(1, n)), ev(n, "complete"))

    async def test_finished_task_after_none_gives_terminal_only(self):
        self.finished_task()
        chunks = await self.read_to_end(self.broker.subscribe(KEY, None))
        self.assertEqual(chunks, [ev(7, "complete").sse])
        self.assertEqual(self.history.lasts, [KEY])
        self.assertNotIn(KEY, self.broker._channels)

    async def test_finished_task_after_zero_gives_all(self):
        self.finished_task()
        chunks = await self.read_to_end(self.broker.subscribe(KEY, 0))
        self.assertEqual(b"".join(chunks), b"".join(e.sse for e in self.history.events[KEY]))
        self.assertTrue(self.history.reads)
        for key, _after, limit in self.history.reads:
            self.assertEqual((key, limit), (KEY, 1000))
        self.assertNotIn(KEY, self.broker._channels)

    async def test_finished_task_after_n(self):
        self.finished_task()
        chunks = await self.read_to_end(self.broker.subscribe(KEY, 3))
        self.assertEqual([s for c in chunks for s in seqs_of(c)], [4, 5, 6, 7])

    async def test_history_read_in_pages_of_history_size(self):
        self.make(history_size=3)
        self.history.add(KEY, *(ev(i) for i in range(1, 10)), ev(10, "error"))
        chunks = await self.read_to_end(self.broker.subscribe(KEY, 0))
        self.assertEqual([s for c in chunks for s in seqs_of(c)], list(range(1, 11)))
        # One read seeds memory with the latest HISTORY_SIZE events (after 7),
        # then the client pages through the older ones; 8.. come from memory.
        self.assertEqual([r[1] for r in self.history.reads], [7, 0, 3, 6])
        self.assertTrue(all(r[2] == 3 for r in self.history.reads))

    async def test_running_task_in_history_only_after_none(self):
        self.make()
        self.history.add(KEY, ev(1), ev(2), ev(3))
        async with contextlib.aclosing(self.broker.subscribe(KEY, None)) as sub:
            self.assertEqual(await self.next_chunk(sub), ev(3).sse)
            await self.publish(ev(4))
            self.assertEqual(await self.next_chunk(sub), ev(4).sse)

    async def test_lagging_subscriber_gets_every_event_once_in_order(self):
        self.make(history_size=5)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            await self.publish(ev(1))
            received = seqs_of(await self.next_chunk(sub))
            for i in range(2, 31):  # the subscriber reads nothing meanwhile
                await self.publish(ev(i))
                self.assertLessEqual(len(self.broker._channels[KEY].events), 10)
            self.assertGreater(self.broker._channels[KEY].events[0].seq, 2)  # 2.. left memory
            reads_before = len(self.history.reads)
            reader = asyncio.create_task(self.read_to_end(sub))
            await asyncio.sleep(0)
            await self.publish(ev(31, "complete"))
            for chunk in await reader:
                received += seqs_of(chunk)
        self.assertEqual(received, list(range(1, 32)))
        self.assertGreater(len(self.history.reads), reads_before)

    async def test_late_joiner_behind_memory_window(self):
        self.make(history_size=5)
        await self.publish(*(ev(i) for i in range(1, 31)))
        self.assertGreater(self.broker._channels[KEY].events[0].seq, 1)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            reader = asyncio.create_task(self.read_to_end(sub))
            await asyncio.sleep(0)
            await self.publish(ev(31, "complete"))
            received = [s for c in await reader for s in seqs_of(c)]
        self.assertEqual(received, list(range(1, 32)))
        self.assertTrue(self.history.reads)

    async def test_gap_not_in_history_is_skipped(self):
        self.make(history_size=5)
        await self.publish(*(ev(i) for i in range(1, 31)), persist=False)
        first_in_memory = self.broker._channels[KEY].events[0].seq
        self.assertGreater(first_in_memory, 1)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            reader = asyncio.create_task(self.read_to_end(sub))
            await asyncio.sleep(0)
            await self.publish(ev(31, "complete"), persist=False)
            received = [s for c in await reader for s in seqs_of(c)]
        self.assertEqual(received, list(range(first_in_memory, 32)))

    async def test_lagging_subscriber_without_history_skips_gap(self):
        self.make(history_size=5)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            await self.publish(ev(1), persist=False)
            received = seqs_of(await self.next_chunk(sub))
            await self.publish(*(ev(i) for i in range(2, 31)), persist=False)
            first_in_memory = self.broker._channels[KEY].events[0].seq
            reader = asyncio.create_task(self.read_to_end(sub))
            await asyncio.sleep(0)
            await self.publish(ev(31, "complete"), persist=False)
            received += [s for c in await reader for s in seqs_of(c)]
        self.assertEqual(received, [1, *range(first_in_memory, 32)])

    async def test_partial_history_then_gap(self):
        self.make(history_size=5)
        await self.publish(*(ev(i) for i in range(1, 13)))  # persisted
        await self.publish(*(ev(i) for i in range(13, 31)), persist=False)
        first_in_memory = self.broker._channels[KEY].events[0].seq
        self.assertGreater(first_in_memory, 13)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            reader = asyncio.create_task(self.read_to_end(sub))
            await asyncio.sleep(0)
            await self.publish(ev(31, "complete"), persist=False)
            received = [s for c in await reader for s in seqs_of(c)]
        self.assertEqual(received, [*range(1, 13), *range(first_in_memory, 32)])

    async def test_terminal_reaching_history_late_is_picked_up_at_next_keepalive(self):
        # The runner writes the terminal event to the log before publishing it;
        # should the log still get it late (another writer), a subscriber that
        # read the log without it picks it up at its next keep-alive wake-up.
        self.make(keepalive=0.05)
        await self.publish(ev(1), ev(2), ev(3))
        await self.publish(ev(4, "complete"), persist=False)
        self.assertNotIn(KEY, self.broker._channels)
        async with contextlib.aclosing(self.broker.subscribe(KEY, None)) as sub:
            self.assertEqual(await self.next_chunk(sub), ev(3).sse)
            self.history.add(KEY, ev(4, "complete"))
            rest = await self.read_to_end(sub)
        self.assertEqual([c for c in rest if c != KEEPALIVE], [ev(4, "complete").sse])

    # Regression (fixed in b1dd83c, memory._ended_by): a subscription whose
    # `after` was already at (or past) the terminal event never ended; it sent
    # keep-alives forever (an EventSource reconnecting with Last-Event-ID = the
    # terminal id after the server closed the stream was held open indefinitely).
    async def test_resume_after_terminal_of_finished_task_ends(self):
        for after in (3, 10):
            with self.subTest(after=after):
                self.make()
                self.history.add(KEY, ev(1), ev(2), ev(3, "complete"))
                async with contextlib.aclosing(self.broker.subscribe(KEY, after)) as sub:
                    try:
                        chunks = await self.read_to_end(sub, timeout=0.5)
                    except TimeoutError:
                        self.fail("the subscription after the terminal event did not end")
                self.assertEqual(chunks, [])
                self.assertNotIn(KEY, self.broker._channels)

    async def test_resume_after_terminal_in_memory_ends(self):
        self.make()
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as holder:
            await self.publish(ev(1))
            await self.next_chunk(holder)  # holds the channel
            await self.publish(ev(2, "complete"))
            self.assertIn(KEY, self.broker._channels)
            async with contextlib.aclosing(self.broker.subscribe(KEY, 2)) as sub:
                try:
                    chunks = await self.read_to_end(sub, timeout=0.5)
                except TimeoutError:
                    self.fail("the subscription after the terminal event did not end")
            self.assertEqual(chunks, [])
            self.assertEqual(await self.read_to_end(holder), [ev(2, "complete").sse])
        self.assertNotIn(KEY, self.broker._channels)

    async def test_waiting_subscription_ends_when_task_ends_at_or_before_after(self):
        # A client resuming with an id ahead of the stream waits; when the task then
        # ends at or before that id there is nothing left for it, and it ends.
        self.make()
        await self.publish(ev(1), ev(2))
        async with contextlib.aclosing(self.broker.subscribe(KEY, 5)) as sub:
            reader = asyncio.create_task(self.read_to_end(sub, timeout=0.5))
            await asyncio.sleep(0.01)
            self.assertFalse(reader.done())
            await self.publish(ev(3), ev(4, "complete"))
            try:
                chunks = await reader
            except TimeoutError:
                self.fail("the subscription did not end after the task ended")
        self.assertEqual(chunks, [])
        self.assertNotIn(KEY, self.broker._channels)


class ChunkTests(BrokerTestCase):
    async def test_waiting_events_coalesce_into_one_chunk(self):
        self.make()
        await self.publish(*(ev(i) for i in range(1, 11)))
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            self.assertEqual(await self.next_chunk(sub), b"".join(ev(i).sse for i in range(1, 11)))

    async def test_live_events_published_together_coalesce(self):
        self.make()
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            reader = asyncio.create_task(self.next_chunk(sub))
            await asyncio.sleep(0.01)
            await self.publish(*(ev(i) for i in range(1, 6)))
            self.assertEqual(await reader, b"".join(ev(i).sse for i in range(1, 6)))

    async def test_chunks_respect_max_chunk_bytes(self):
        size = len(ev(10).sse)
        self.assertEqual({len(ev(i).sse) for i in range(10, 100)}, {size})
        max_chunk = int(size * 2.5)
        self.make(max_chunk=max_chunk)
        events = [*(ev(i) for i in range(10, 99)), ev(99, "error")]
        await self.publish(*events)
        chunks = await self.read_to_end(self.broker.subscribe(KEY, 9))
        self.assertEqual(b"".join(chunks), b"".join(e.sse for e in events))
        self.assertEqual([len(seqs_of(c)) for c in chunks], [3] * 30)
        for chunk in chunks:
            last = next(e for e in events if e.seq == seqs_of(chunk)[-1])
            self.assertTrue(chunk.endswith(last.sse))
            self.assertLess(len(chunk) - len(last.sse), max_chunk)  # over by at most one event

    async def test_chunks_from_history_respect_max_chunk_bytes(self):
        self.make(max_chunk=300, history_size=4)
        events = [ev(i, pad="x" * (i * 7 % 90)) for i in range(1, 40)] + [ev(40, "complete")]
        self.history.add(KEY, *events)
        chunks = await self.read_to_end(self.broker.subscribe(KEY, 0))
        self.assertEqual(b"".join(chunks), b"".join(e.sse for e in events))
        by_seq = {e.seq: e for e in events}
        self.assertTrue(any(len(seqs_of(c)) > 1 for c in chunks))
        for chunk in chunks:
            last = by_seq[seqs_of(chunk)[-1]]
            self.assertLess(len(chunk) - len(last.sse), 300)

    async def test_event_bigger_than_max_chunk_goes_alone(self):
        self.make(max_chunk=10)
        await self.publish(*(ev(i) for i in range(1, 5)), ev(5, "complete"))
        chunks = await self.read_to_end(self.broker.subscribe(KEY, 0))
        self.assertEqual([seqs_of(c) for c in chunks], [[1], [2], [3], [4], [5]])


class KeepaliveAndCloseTests(BrokerTestCase):
    async def test_idle_subscription_gets_keepalive(self):
        self.make(keepalive=0.05)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            started = time.monotonic()
            self.assertEqual(await self.next_chunk(sub, timeout=1.0), KEEPALIVE)
            self.assertGreaterEqual(time.monotonic() - started, 0.04)
            self.assertEqual(await self.next_chunk(sub, timeout=1.0), KEEPALIVE)
            await self.publish(ev(1))
            self.assertEqual(await self.next_chunk(sub, timeout=1.0), ev(1).sse)

    async def test_keepalive_after_caught_up(self):
        self.make(keepalive=0.05)
        await self.publish(ev(1), ev(2))
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            self.assertEqual(await self.next_chunk(sub), ev(1).sse + ev(2).sse)
            self.assertEqual(await self.next_chunk(sub, timeout=1.0), KEEPALIVE)

    async def test_no_keepalive_before_interval(self):
        self.make(keepalive=60.0)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            with self.assertRaises(TimeoutError):
                await self.next_chunk(sub, timeout=0.1)

    async def test_close_subscriptions_ends_open_ones_with_retry_hint(self):
        self.make()
        other = TaskKey("demo.exampletask", "2")
        await self.publish(ev(1), key=other)
        subs = [
            self.broker.subscribe(KEY, 0),
            self.broker.subscribe(KEY, None),
            self.broker.subscribe(other, 0),
        ]
        readers = [asyncio.create_task(self.read_to_end(s)) for s in subs]

        def all_caught_up():
            channels = [self.broker._channels.get(k) for k in (KEY, other)]
            live = [sub.live for channel in channels if channel for sub in channel.subs]
            return len(live) == 3 and all(live)

        async with asyncio.timeout(WAIT):
            while not all_caught_up():  # noqa: ASYNC110 - polls the hub's state; no event to wait on
                await asyncio.sleep(0.001)
        self.assertFalse(any(r.done() for r in readers))
        self.broker.close_subscriptions()
        results = await asyncio.gather(*readers)
        hint = retry_hint(RECONNECT_HINT_MS)
        self.assertEqual(hint, b"retry: 1000\n\n")
        self.assertEqual(results[0], [hint])
        self.assertEqual(results[1], [hint])
        self.assertEqual(results[2], [ev(1).sse, hint])

    async def test_subscribe_after_close_ends_at_once(self):
        self.make()
        await self.publish(ev(1))
        self.broker.close_subscriptions()
        self.assertEqual(await self.read_to_end(self.broker.subscribe(KEY, 0)), [b"retry: 1000\n\n"])


class ChannelLifetimeTests(BrokerTestCase):
    async def test_dropped_at_terminal_without_subscribers(self):
        self.make()
        await self.publish(ev(1), ev(2))
        self.assertIn(KEY, self.broker._channels)
        await self.publish(ev(3, "cancelled"))
        self.assertNotIn(KEY, self.broker._channels)

    async def test_dropped_when_last_subscriber_finishes(self):
        self.make()
        sub = self.broker.subscribe(KEY, 0)
        await self.publish(ev(1))
        self.assertEqual(await self.next_chunk(sub), ev(1).sse)
        self.assertEqual(self.broker._channels[KEY].refs, 1)
        await self.publish(ev(2, "complete"))
        self.assertIn(KEY, self.broker._channels)  # held by the subscriber
        self.assertEqual(await self.read_to_end(sub), [ev(2, "complete").sse])
        self.assertNotIn(KEY, self.broker._channels)

    async def test_dropped_when_subscriber_closes_before_reading_terminal(self):
        self.make()
        sub = self.broker.subscribe(KEY, 0)
        await self.publish(ev(1))
        await self.next_chunk(sub)
        await self.publish(ev(2, "error"))
        self.assertIn(KEY, self.broker._channels)
        await sub.aclose()
        self.assertNotIn(KEY, self.broker._channels)

    async def test_kept_while_running_and_dropped_at_terminal(self):
        self.make()
        sub = self.broker.subscribe(KEY, 0)
        await self.publish(ev(1))
        await self.next_chunk(sub)
        await sub.aclose()
        channel = self.broker._channels[KEY]  # task still running: recent events stay
        self.assertEqual(channel.refs, 0)
        await self.publish(ev(2, "complete"))
        self.assertNotIn(KEY, self.broker._channels)

    async def test_empty_channel_of_a_subscriber_is_dropped(self):
        self.make()
        sub = self.broker.subscribe(KEY, None)
        reader = asyncio.create_task(self.next_chunk(sub))
        await asyncio.sleep(0.01)
        self.assertIn(KEY, self.broker._channels)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await sub.aclose()
        self.assertNotIn(KEY, self.broker._channels)

    async def test_memory_does_not_grow_with_finished_tasks(self):
        self.make(history_size=5)
        for task in range(200):
            key = TaskKey("demo.exampletask", str(task))
            sub = self.broker.subscribe(key, 0)
            reader = asyncio.create_task(self.read_to_end(sub))
            await asyncio.sleep(0)
            await self.publish(*(ev(i) for i in range(1, 4)), ev(4, "complete"), key=key)
            self.assertEqual(len(b"".join(await reader).split(b"\n\n")) - 1, 4)
            late = await self.read_to_end(self.broker.subscribe(key, None))
            self.assertEqual(late, [ev(4, "complete").sse])
        self.assertEqual(self.broker._channels, {})


class PublishTests(BrokerTestCase):
    async def test_publish_never_blocks_on_a_subscriber_that_does_not_read(self):
        self.make(history_size=50)
        idle = self.broker.subscribe(KEY, 0)  # never iterated
        stalled = self.broker.subscribe(KEY, 0)  # reads once, then stops reading
        await self.publish(ev(1))
        self.assertEqual(await self.next_chunk(stalled), ev(1).sse)
        channel = self.broker._channels[KEY]
        asyncio.get_running_loop().slow_callback_duration = 10  # debug mode: no "took 0.1 s" warning
        async with asyncio.timeout(5):
            for i in range(2, 10_002):
                await self.publish(ev(i))
                self.assertLessEqual(len(channel.events), 100)
        self.assertIs(self.broker._channels[KEY], channel)
        self.assertEqual(channel.events[-1].seq, 10_001)
        # The stalled subscriber catches up from the log, every event once, in order.
        reader = asyncio.create_task(self.read_to_end(stalled, timeout=10))
        await asyncio.sleep(0)
        await self.publish(ev(10_002, "complete"))
        received = [s for c in await reader for s in seqs_of(c)]
        self.assertEqual(received, list(range(2, 10_003)))
        await idle.aclose()
        self.assertNotIn(KEY, self.broker._channels)

    async def test_publish_does_not_yield_to_the_loop(self):
        # A callback scheduled before publish() runs only if publish() gives the
        # loop a turn; it must not (a publish is a list append and a notify), and a
        # waiting subscriber then gets everything published meanwhile in one chunk.
        self.make()
        loop = asyncio.get_running_loop()
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            reader = asyncio.create_task(self.next_chunk(sub))
            await asyncio.sleep(0.01)
            marker = loop.create_future()
            loop.call_soon(marker.set_result, None)
            for i in range(1, 101):
                await self.broker.publish(KEY, ev(i))
            self.assertFalse(marker.done())
            self.assertFalse(reader.done())
            self.assertEqual(seqs_of(await reader), list(range(1, 101)))


class WakeTests(BrokerTestCase):
    async def test_the_local_transport_wakes_the_bound_callback(self):
        self.make()
        calls = []
        self.transport.bind(self.broker, on_wake=lambda: calls.append("woken"))
        self.transport.wake_all()
        await self.transport.wake()
        self.assertEqual(calls, ["woken", "woken"])


class MemoryFillsDuringLogReadTests(BrokerTestCase):
    async def test_a_client_never_goes_back_when_memory_fills_while_it_reads_the_log(self):
        # The Redis broker's reader fills a new channel from older events while
        # a subscriber, already past them, reads the log: it must not replay.
        self.make(keepalive=0.05)
        self.history.add(KEY, ev(1), ev(2), ev(3), ev(4))
        original_read = self.history.read

        async def read_while_memory_fills(*args):
            events = await original_read(*args)
            for event in (ev(1), ev(2), ev(3), ev(4), ev(5)):
                await self.broker.publish(KEY, event)
            return events

        async with contextlib.aclosing(self.broker.subscribe(KEY, 3)) as sub:
            self.history.read = read_while_memory_fills
            first = await self.next_chunk(sub)
            self.history.read = original_read
            received = seqs_of(first)
            while received[-1] < 5:
                received += seqs_of(await self.next_chunk(sub))
        self.assertEqual(received, [4, 5])


class MissedEndTests(BrokerTestCase):
    async def test_an_end_that_only_reached_the_log_still_ends_idle_streams(self):
        # A node died after writing the end to the log, before sending it on.
        self.make(keepalive=0.05)
        await self.publish(ev(1), ev(2))
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            self.assertEqual(seqs_of(await self.next_chunk(sub)), [1, 2])
            self.history.add(KEY, ev(3), ev(4, "complete"))  # never published
            rest = await self.read_to_end(sub)
        self.assertEqual([s for chunk in rest if chunk != KEEPALIVE for s in seqs_of(chunk)], [3, 4])


class MissedEndRaceTests(BrokerTestCase):
    async def test_a_look_at_a_dropped_channel_leaves_the_new_one_alone(self):
        # The tick's look for a missed end waits on the log; meanwhile its
        # channel's clients leave and a new client opens a new channel.
        self.make()
        gate = asyncio.Event()
        original_last = self.history.last

        async def gated_last(*args):
            await gate.wait()
            return await original_last(*args)

        first = self.broker.subscribe(KEY, None)
        reader = asyncio.create_task(anext(first))
        await asyncio.sleep(0.01)
        old = self.broker._channels[KEY]
        self.history.last = gated_last
        look = asyncio.create_task(self.broker._look_for_a_missed_end(KEY, old))
        await asyncio.sleep(0.01)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await first.aclose()
        self.assertNotIn(KEY, self.broker._channels)
        self.history.last = original_last
        async with contextlib.aclosing(self.broker.subscribe(KEY, None)) as second:
            waiting = asyncio.create_task(anext(second))
            await asyncio.sleep(0.01)
            new = self.broker._channels[KEY]
            self.history.add(KEY, ev(1), ev(2, "complete"))  # the task ended elsewhere
            gate.set()
            await look
            self.assertIs(self.broker._channels.get(KEY), new)  # still reachable by publish and the tick
            await self.publish(ev(1), ev(2, "complete"), persist=False)
            self.assertEqual(seqs_of(await waiting), [1, 2])


class TickerTests(BrokerTestCase):
    async def test_a_stuck_log_query_does_not_stop_keepalives(self):
        self.make(keepalive=0.05)
        other = TaskKey("demo.exampletask", "2")
        original_last = self.history.last
        calls = {}

        async def last(key):
            calls[key.pk] = calls.get(key.pk, 0) + 1
            if key.pk == "2" and calls[key.pk] > 1:  # its seed passes; every later look hangs
                await asyncio.Event().wait()
            return await original_last(key)

        self.history.last = last
        async with (
            contextlib.aclosing(self.broker.subscribe(other, 0)) as stuck,
            contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub,
        ):
            first_of_stuck = asyncio.create_task(self.next_chunk(stuck, timeout=1.0))
            keepalives = [await self.next_chunk(sub, timeout=1.0) for _ in range(5)]
            self.assertEqual(keepalives, [KEEPALIVE] * 5)
            self.assertGreater(calls.get("2", 0), 1)  # its looks did hang meanwhile
            self.assertEqual(await first_of_stuck, KEEPALIVE)


class SeedingTests(BrokerTestCase):
    async def test_many_clients_arriving_at_once_read_the_log_once(self):
        self.make()
        self.history.add(KEY, ev(1), ev(2))
        subs = [self.broker.subscribe(KEY, None) for _ in range(200)]
        firsts = await asyncio.gather(*(self.next_chunk(sub) for sub in subs))
        self.assertEqual({seqs_of(c)[0] for c in firsts}, {2})
        self.assertEqual(len(self.history.lasts), 1)
        self.assertEqual(len(self.history.reads), 1)
        await self.publish(ev(3))
        nexts = await asyncio.gather(*(self.next_chunk(sub) for sub in subs))
        self.assertEqual({seqs_of(c)[0] for c in nexts}, {3})
        self.assertEqual(len(self.history.reads), 1, "live events come from memory")
        for sub in subs:
            await sub.aclose()

    async def test_clients_of_a_task_not_started_wait_without_polling_the_log(self):
        self.make(keepalive=0.02)
        async with contextlib.aclosing(self.broker.subscribe(KEY, 0)) as sub:
            self.assertEqual(await self.next_chunk(sub), KEEPALIVE)
            self.assertEqual(await self.next_chunk(sub), KEEPALIVE)
            reads = len(self.history.reads)
            self.assertEqual(await self.next_chunk(sub), KEEPALIVE)
            self.assertEqual(len(self.history.reads), reads)
            await self.publish(ev(1))
            self.assertEqual(seqs_of(await self.next_chunk(sub)), [1])
