"""The in-process broker: the embedded default (one process, no services)."""

import asyncio
import logging
from bisect import bisect_right
from collections.abc import Callable

from ..events import KEEPALIVE, Event, retry_hint
from .base import Broker

RECONNECT_HINT_MS = 1000

logger = logging.getLogger(__name__)


def _seq(event: Event) -> int:
    return event.seq


def _ended_by(latest: Event | None, after: int) -> bool:
    """True when ``latest`` is the task's end and a client at ``after`` has seen it."""
    return latest is not None and latest.terminal and latest.seq <= after


class Channel:
    """One task's recent events and the signal its subscribers wait on."""

    __slots__ = ("active_at", "changed", "checked_at", "events", "refs", "seeded", "seeding", "ticks")

    def __init__(self):
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self.refs = 0
        self.active_at = asyncio.get_running_loop().time()  # of the last event
        self.ticks = 0  # keep-alive rounds: a subscriber woken by one sends a comment
        self.checked_at = 0.0  # last look in the log for an end that never came live
        # Memory holds the log's recent events too (not only live ones), so
        # an empty list means "nothing yet", not "ask the log".
        self.seeded = False
        self.seeding: asyncio.Future | None = None

    def notify(self) -> None:
        # Waiters hold the old Event; a fresh one serves the next round.
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    @property
    def done(self) -> bool:
        return not self.events or self.events[-1].terminal


class MemoryBroker(Broker):
    """Fans events out to the subscribers of this process.

    Each task has one shared list of recent events; a subscriber is a cursor
    into it, so a slow subscriber holds no copy of anything and a publish
    costs the same however many subscribers lag. Subscribers that fall
    behind the list, and late ones asking for old events, read the event log.
    """

    def __init__(self, *, history, settings):
        self._history = history
        self._history_size = settings.HISTORY_SIZE
        self._keepalive = settings.KEEPALIVE_INTERVAL
        self._max_chunk = settings.MAX_CHUNK_BYTES
        self._channels: dict[str, Channel] = {}
        self._closing = False
        self._wake_callbacks: list[Callable[[], None]] = []
        self._ticker: asyncio.Task | None = None

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None

    async def _tick(self) -> None:
        """One timer for the node, not one per stream: every half interval,
        channels silent for KEEPALIVE_INTERVAL wake their subscribers for a
        keep-alive comment (and look in the log for an end they missed)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._keepalive / 2)
            now = loop.time()
            for key, channel in list(self._channels.items()):
                if channel.refs and now - channel.active_at >= self._keepalive:
                    channel.active_at = now
                    channel.ticks += 1
                    channel.notify()
                    task_type, _, task_id = key.partition(":")
                    try:
                        await self._look_for_a_missed_end(channel, task_type, task_id)
                    except Exception:
                        logger.exception("Looking for the end of %s failed", key)

    # -- runner side --------------------------------------------------------

    async def publish(self, key: str, event: Event) -> None:
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel()
        self._append(key, channel, event)

    def _append(self, key: str, channel: Channel, event: Event) -> None:
        events = channel.events
        if events and event.seq <= events[-1].seq:
            return  # already here (another path delivered it first)
        events.append(event)
        channel.active_at = asyncio.get_running_loop().time()
        if len(events) > 2 * self._history_size:
            del events[: len(events) - self._history_size]
        channel.notify()
        if event.terminal and channel.refs == 0:
            del self._channels[key]

    def wake_runners(self) -> None:
        for callback in self._wake_callbacks:
            callback()

    async def wake(self) -> None:
        self.wake_runners()

    def on_wake(self, callback: Callable[[], None]) -> None:
        self._wake_callbacks.append(callback)

    # -- HTTP side --------------------------------------------------------------

    async def subscribe(self, key: str, after: int | None):
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel()
        channel.refs += 1
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="streaming-keepalive")
        task_type, _, task_id = key.partition(":")
        try:
            await self._seed(channel, task_type, task_id)
            latest = channel.events[-1] if channel.events else None
            if after is None:  # the seed's rule: the latest event at once, then the rest
                after = latest.seq - 1 if latest else 0
            elif _ended_by(latest, after):
                return  # the client has seen the end already
            ticks = channel.ticks
            while not self._closing:
                changed = channel.changed
                batch = self._from_memory(channel, after)
                if batch is None:
                    batch = await self._history.read(task_type, task_id, after, self._history_size)
                    if channel.events:  # it may have filled while we read the log
                        first_in_memory = channel.events[0].seq
                        batch = [e for e in batch if e.seq < first_in_memory]
                        if not batch:
                            # A gap the log does not fill (persistence off), or
                            # memory caught up meanwhile: go on from memory,
                            # never back before what this client already has.
                            after = max(after, first_in_memory - 1)
                            continue
                if batch:
                    chunk, after, terminal = self._chunk(batch)
                    yield chunk
                    if terminal:
                        return
                    continue
                if channel.events and _ended_by(channel.events[-1], after):
                    return
                if channel.ticks != ticks:
                    ticks = channel.ticks
                    yield KEEPALIVE
                    continue
                await changed.wait()
            yield retry_hint(RECONNECT_HINT_MS)
        finally:
            channel.refs -= 1
            if channel.refs == 0 and channel.done and self._channels.get(key) is channel:
                del self._channels[key]

    async def _seed(self, channel: Channel, task_type, task_id) -> None:
        """Load the task's recent events from the log into memory, once per channel.

        However many clients arrive at once (a thousand watchers of a task
        about to start), the log is read once, not once or twice per client.
        """
        if channel.seeded:
            return
        if channel.seeding is None:
            channel.seeding = asyncio.ensure_future(self._load_seed(channel, task_type, task_id))
        try:
            await asyncio.shield(channel.seeding)
        finally:
            if channel.seeding is not None and channel.seeding.done():
                channel.seeding = None

    async def _load_seed(self, channel: Channel, task_type, task_id) -> None:
        latest = await self._history.last(task_type, task_id)
        recent: list[Event] = []
        if latest is not None:
            recent = await self._history.read(
                task_type, task_id, max(0, latest.seq - self._history_size), self._history_size
            )
        if channel.events:  # published meanwhile
            first = channel.events[0].seq
            if recent and recent[-1].seq >= first - 1:
                # The log reaches memory: one contiguous list.
                channel.events[:0] = [e for e in recent if e.seq < first]
            # Otherwise memory starts after a stretch the log read did not
            # cover (trimmed meanwhile, or a numbering gap): leave it; older
            # events stay a log read away, as for any lagging client.
        else:
            channel.events[:] = recent
        channel.seeded = True

    async def _look_for_a_missed_end(self, channel: Channel, task_type, task_id) -> None:
        """Once per keep-alive interval per idle task: did it end without us hearing?

        With Redis, a node that dies between writing a task's end to the log
        and sending it to Redis leaves remote watchers waiting forever. If the
        log has an end newer than memory, drop memory (the log holds it all)
        so every subscriber reads on from the log and reaches the end.
        """
        now = asyncio.get_running_loop().time()
        if now - channel.checked_at < self._keepalive:
            return
        channel.checked_at = now
        if channel.events and channel.events[-1].terminal:
            return
        latest = await self._history.last(task_type, task_id)
        newest_here = channel.events[-1].seq if channel.events else 0
        if latest is not None and latest.terminal and latest.seq > newest_here:
            channel.events.clear()
            channel.seeded = False  # read on from the log
            channel.notify()

    def _from_memory(self, channel: Channel, after: int) -> list[Event] | None:
        """Events after ``after`` held in memory; None when older ones may be missing."""
        events = channel.events
        if not events:
            return [] if channel.seeded else None
        if events[0].seq > after + 1:
            return None
        return events[bisect_right(events, after, key=_seq) :]

    def _chunk(self, batch: list[Event]) -> tuple[bytes, int, bool]:
        parts = []
        size = 0
        for event in batch:
            parts.append(event.sse)
            size += len(event.sse)
            if event.terminal or size >= self._max_chunk:
                break
        last = batch[len(parts) - 1]
        return b"".join(parts), last.seq, last.terminal

    def close_subscriptions(self) -> None:
        self._closing = True
        for channel in self._channels.values():
            channel.notify()
