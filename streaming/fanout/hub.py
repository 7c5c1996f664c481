"""The local fanout hub: one per process, the same in every mode.

Delivery is pushed, not pulled. Each task has one ``Channel``: a shared list
of recent events and the set of its subscribers. A subscriber is a cursor and
a ``Sink`` (a client's socket, or the queue behind ``subscribe()``). A
subscriber that is caught up is *live*: when events arrive, the channel
writes the same bytes to every live sink in one pass, as a raw broadcast
server would, with no task, coroutine or queue per client. A subscriber
that is behind (a late joiner, a resume, a client whose socket is full)
gets a short-lived catch-up task that sends what it misses, from memory or
from the event log, and joins the live set again once it has caught up.
"""

import asyncio
import contextlib
import logging
from bisect import bisect_right
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

from ..events import KEEPALIVE, Event, retry_hint
from ..keys import TaskKey
from ..transports.base import History, Transport
from .sinks import QueueSink, Sink

if TYPE_CHECKING:
    from ..conf import StreamingSettings
    from .mux import Mux

RECONNECT_HINT_MS = 1000
LOOKS_AT_ONCE = 4  # log queries for missed ends running together (the ORM has one thread)

logger = logging.getLogger(__name__)


# A chunk for a client: its bytes, its last seq, whether it ends the stream, its number of events.
Piece = tuple[bytes, int, bool, int]


class RunningTask(NamedTuple):
    """A task found running in the database, for a feed that may lack it."""

    key: TaskKey
    started_at: float | None  # its run's claim (time.time() scale); None: not recorded
    attempt: int


# A model's running tasks (by its label), the most recently started first:
# what a feed re-reads when announcements may have been lost.
RunningReader = Callable[[str], Awaitable[list[RunningTask]]]


def _seq(event: Event) -> int:
    return event.seq


def _ended_by(latest: Event | None, after: int) -> bool:
    """True when ``latest`` is the task's end and a client at ``after`` has seen it."""
    return latest is not None and latest.terminal and latest.seq <= after


class Subscriber:
    """A client of one task: its cursor (the last seq it was sent) and its sink."""

    __slots__ = ("after", "channel", "closed", "expiry", "key", "sink", "task")

    def __init__(self, key: TaskKey, channel: "Channel", sink: Sink) -> None:
        self.key = key
        self.channel = channel
        self.sink = sink
        self.after = 0  # placed by Hub._start(), before anything is written to the sink
        self.task: asyncio.Task[None] | None = None  # catching up; None: live
        self.closed = False
        self.expiry: asyncio.TimerHandle | None = None  # ends a stream whose access runs out

    @property
    def live(self) -> bool:
        return self.task is None and not self.closed


class Channel:
    """One task's recent events and its subscribers."""

    __slots__ = ("active_at", "checked_at", "events", "flush_pending", "looking", "seeded", "seeding", "subs")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.subs: set[Subscriber] = set()
        self.flush_pending = False
        self.active_at = asyncio.get_running_loop().time()  # of the last write
        self.checked_at = 0.0  # last look in the log for an end that never came live
        self.looking = False  # such a look is in progress
        # Memory holds the log's recent events too (not only live ones), so
        # an empty list means "nothing yet", not "ask the log".
        self.seeded = False
        self.seeding: asyncio.Future[None] | None = None

    @property
    def refs(self) -> int:
        return len(self.subs)

    @property
    def done(self) -> bool:
        return not self.events or self.events[-1].terminal


class Hub:
    """Fans events out to the subscribers of this process.

    Each task has one shared list of recent events; a subscriber is a cursor
    into it, so a slow subscriber holds no copy of anything and a publish
    costs the same however many subscribers lag. Subscribers that fall
    behind the list, and late ones asking for old events, read ``history``
    (the event log, or the transport's recent history in front of it).
    Events published in other processes arrive through ``transport``.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        history: History,
        settings: "StreamingSettings",
        running: RunningReader | None = None,
    ) -> None:
        self._transport = transport
        self._history = history
        self._history_size = settings.HISTORY_SIZE
        self._keepalive = settings.KEEPALIVE_INTERVAL
        self._max_chunk = settings.MAX_CHUNK_BYTES
        self.send_timeout = settings.CLIENT_SEND_TIMEOUT
        self._channels: dict[TaskKey, Channel] = {}
        self._watchers: dict[TaskKey, int] = {}  # key -> local subscribers (the transport's watch)
        self._publishing: set[TaskKey] = set()  # tasks a runner of this process is running
        self._closing = False
        self._ticker: asyncio.Task[None] | None = None
        self._looks: set[asyncio.Task[None]] = set()
        self._look_slots = asyncio.Semaphore(LOOKS_AT_ONCE)
        self._feeds: dict[str, set[Mux]] = {}  # model label -> muxes following its new tasks
        self._running = running
        self._rereading: asyncio.Task[None] | None = None
        self._reread_again = False  # announcements were lost again during a re-read
        # What this hub did, as plain counts (web/metrics.py reads them when
        # scraped): added per publish, per chunk or per flush, never per
        # event per client.
        self.published = 0  # events this process's runs published
        self.received = 0  # events that came from other processes (the transport)
        self.delivered = 0  # events written to clients (an event to 10 clients counts 10)
        self.bytes_written = 0  # event bytes written to clients
        self.resumes = 0  # streams opened after an event they already had (Last-Event-ID)
        self.resumes_incomplete = 0  # catch-ups that skipped events neither memory nor the log held
        self.cut_off = 0  # clients cut off for reading nothing for CLIENT_SEND_TIMEOUT

    async def stop(self) -> None:
        tasks = [*self._looks, *([self._ticker] if self._ticker else [])]
        if self._rereading is not None:
            tasks.append(self._rereading)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ticker = None

    async def _tick(self) -> None:
        """One timer for the node, not one per stream: every half interval,
        live subscribers of channels silent for KEEPALIVE_INTERVAL get a
        keep-alive comment (and the log is asked for an end they missed)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._keepalive / 2)
            now = loop.time()
            idle = []
            for key, channel in list(self._channels.items()):
                if channel.subs and now - channel.active_at >= self._keepalive:
                    channel.active_at = now
                    idle.append((key, channel))
                    for sub in list(channel.subs):
                        if sub.live:
                            if sub.sink.paused:  # nothing read for a while: see if it is stalled
                                self._fall_behind(sub)
                            else:
                                sub.sink.write(KEEPALIVE)
            for mux in {mux for following in self._feeds.values() for mux in following}:
                if not mux.views and not mux.sink.paused:  # a feed waiting for its next task
                    mux.sink.write(KEEPALIVE)
            # Off the ticker: a slow or stuck query must not hold back the
            # next round of keep-alives.
            for key, channel in idle:
                if not channel.looking:
                    channel.looking = True
                    look = asyncio.create_task(self._look(key, channel), name=f"streaming-look:{key}")
                    self._looks.add(look)
                    look.add_done_callback(self._looks.discard)

    async def _look(self, key: TaskKey, channel: Channel) -> None:
        try:
            async with self._look_slots, asyncio.timeout(self._keepalive / 2):
                await self._look_for_a_missed_end(key, channel)
        except Exception:
            logger.warning("Looking in the log for the end of %s failed", key, exc_info=True)
        finally:
            channel.looking = False

    # -- runner side --------------------------------------------------------

    async def publish(self, key: TaskKey, event: Event) -> None:
        """A runner of this process sent ``event``: to local subscribers, and on."""
        if event.terminal:
            self._publishing.discard(key)
        else:
            self._publishing.add(key)
        self.published += 1
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel()
        self._append(key, channel, event)
        self._transport.publish(key, event)

    def started(self, starts: list[tuple[TaskKey, int]]) -> None:
        """Tasks just claimed by a runner of this process, each with the seq
        after which its run numbers events: announced here and to every other
        node, for the feeds (multiplexed streams) that follow their models."""
        self.announced(starts)
        self._transport.announce(starts)

    def run_stopped(self, key: TaskKey) -> None:
        """This process's run of ``key`` is over. A run that lost its lease sent
        no end: its channel would otherwise stay here, fed by nobody."""
        self._publishing.discard(key)
        channel = self._channels.get(key)
        if channel is not None and not channel.subs:
            del self._channels[key]

    # -- transport side (Receiver) ------------------------------------------------

    def deliver(self, key: TaskKey, event: Event) -> None:
        """An event published in another process, for this process's subscribers."""
        channel = self._channels.get(key)
        if channel is not None:
            if not channel.events or event.seq > channel.events[-1].seq:
                self.received += 1  # not one this process published (Redis gives those back too)
            self._append(key, channel, event)

    def announced(self, starts: list[tuple[TaskKey, int]]) -> None:
        """Tasks that started running (here or on another node): each feed of
        their model streams them from their run's first event."""
        if not self._feeds:
            return
        for key, after in starts:
            for mux in list(self._feeds.get(key.label, ())):
                mux.add(key, after)

    def announcements_lost(self) -> None:
        """Announcements may have gone by unheard (the transport's channel was
        down and is back): every feed of this process re-reads its model's
        running tasks and adds those it lacks. Off the per-event path: once
        per reconnection, one query per followed model."""
        if not self._feeds or self._running is None or self._closing:
            return
        if self._rereading is not None and not self._rereading.done():
            self._reread_again = True  # the read in progress may predate this loss
            return
        self._rereading = asyncio.create_task(self._reread(self._running), name="streaming-feeds-reread")

    async def _reread(self, read: RunningReader) -> None:
        while True:
            self._reread_again = False
            for label in list(self._feeds):
                try:
                    running = await read(label)
                except Exception:
                    # As when a feed's first read fails: its clients reconnect,
                    # and their feeds read the running tasks again.
                    logger.exception("Re-reading the running tasks of %s for its feeds failed", label)
                    for mux in list(self._feeds.get(label, ())):
                        mux.end()
                    continue
                for mux in list(self._feeds.get(label, ())):
                    for task in running:
                        mux.rejoin(task)
            if not self._reread_again:
                return

    def held_seq(self, key: TaskKey) -> int | None:
        channel = self._channels.get(key)
        return channel.events[-1].seq if channel is not None and channel.events else None

    def _append(self, key: TaskKey, channel: Channel, event: Event) -> None:
        events = channel.events
        if events and event.seq <= events[-1].seq:
            return  # already here (another path delivered it first)
        events.append(event)
        if len(events) > 2 * self._history_size:
            del events[: len(events) - self._history_size]
        if channel.subs and not channel.flush_pending:
            # Written at the loop's next turn: everything published until then
            # (a burst, a batch from Redis) goes out in one write per client.
            channel.flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush, key, channel)
        if event.terminal and not channel.subs and self._channels.get(key) is channel:
            del self._channels[key]

    def _flush(self, key: TaskKey, channel: Channel) -> None:
        """Write what the live subscribers have not had yet: the same bytes to each.

        Live subscribers nearly always share one cursor (the first one seen
        here): they take its pieces with no lookup, and are counted together
        at the end. One with another cursor, or whose socket fills, is
        counted by itself.
        """
        channel.flush_pending = False
        channel.active_at = asyncio.get_running_loop().time()
        pieces_after: dict[int, list[Piece] | None] = {}
        latest = channel.events[-1] if channel.events else None
        end_seq = latest.seq if latest is not None and latest.terminal else None
        common: list[Piece] = []  # the pieces of the first live cursor
        common_after = -1  # that cursor (none yet)
        subs = list(channel.subs)
        outside = 0  # subscribers not written the common pieces in full
        counted: list[tuple[list[Piece], Subscriber]] = []  # written other pieces, or stopped partway
        for sub in subs:
            if sub.task is not None or sub.closed:  # catching up by itself, or gone
                outside += 1
                continue
            after = sub.after
            if after == common_after:
                pieces = common
            else:  # the first live subscriber, or one at another cursor
                if after not in pieces_after:  # computed once per cursor
                    batch = self._from_memory(channel, after)
                    pieces_after[after] = None if batch is None else list(self._pieces(batch))
                found = pieces_after[after]
                if found is None:  # memory no longer reaches back to it
                    outside += 1
                    self._fall_behind(sub)
                    continue
                pieces = found
                if common_after < 0:
                    common, common_after = pieces, after
                else:
                    outside += 1
                    counted.append((pieces, sub))
            sink = sub.sink
            for data, last, terminal, _count in pieces:
                if sink.paused:
                    if pieces is common:
                        outside += 1
                        counted.append((pieces, sub))
                    self._fall_behind(sub)
                    break
                sink.write(data)
                sub.after = last
                if terminal:
                    self._end(sub)
                    break
            else:
                if end_seq is not None and sub.after >= end_seq:  # it resumed past the end
                    self._end(sub)
        if common:
            sinks = len(subs) - outside
            for data, _last, _terminal, count in common:
                self.delivered += sinks * count
                self.bytes_written += sinks * len(data)
        for pieces, sub in counted:
            for data, last, _terminal, count in pieces:
                if last > sub.after:  # where it stopped (its socket was full)
                    break
                self.delivered += count
                self.bytes_written += len(data)

    # -- HTTP side --------------------------------------------------------------

    def attach(
        self, key: TaskKey, after: int | None, sink: Sink, *, ends_in: float | None = None, last: bytes = b""
    ) -> Subscriber:
        """Start streaming task ``key`` into ``sink``: the events after ``after``
        (None: the latest one first), then live ones, until the task's end,
        or for at most ``ends_in`` seconds (its access runs out), when ``last``
        is written and the stream ends.

        The caller calls ``detach()`` when the client goes away.
        """
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel()
        sub = Subscriber(key, channel, sink)
        if ends_in is not None:  # one timer for such a stream; none for the others
            sub.expiry = asyncio.get_running_loop().call_later(max(0.0, ends_in), self.end, sub, last)
        channel.subs.add(sub)
        self._watch(key)
        self._keep_alive()
        sub.task = asyncio.create_task(self._start(sub, after), name=f"streaming-subscribe:{key}")
        return sub

    def detach(self, sub: Subscriber) -> None:
        """Forget a subscriber (its client left, or its stream ended)."""
        if sub.closed:
            return
        sub.closed = True
        if sub.expiry is not None:
            sub.expiry.cancel()
            sub.expiry = None
        task, sub.task = sub.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        channel = sub.channel
        channel.subs.discard(sub)
        self._unwatch(sub.key)
        if not channel.subs and channel.done and self._channels.get(sub.key) is channel:
            del self._channels[sub.key]

    def follow(self, mux: "Mux") -> None:
        """``mux`` streams every task of its feeds' models that starts from now on."""
        for label in mux.feeds:
            self._feeds.setdefault(label, set()).add(mux)
        self._keep_alive()

    def _keep_alive(self) -> None:
        if (self._ticker is None or self._ticker.done()) and not self._closing:
            self._ticker = asyncio.create_task(self._tick(), name="streaming-keepalive")

    def unfollow(self, mux: "Mux") -> None:
        for label in mux.feeds:
            following = self._feeds.get(label)
            if following is not None:
                following.discard(mux)
                if not following:
                    del self._feeds[label]

    def _watch(self, key: TaskKey) -> None:
        count = self._watchers.get(key, 0)
        self._watchers[key] = count + 1
        if count == 0:
            self._transport.watch(key)

    def _unwatch(self, key: TaskKey) -> None:
        count = self._watchers[key] - 1
        if count:
            self._watchers[key] = count
            return
        del self._watchers[key]
        self._transport.unwatch(key)
        channel = self._channels.get(key)
        if channel is not None and not channel.subs and key not in self._publishing:
            del self._channels[key]  # nothing feeds it any more

    async def subscribe(
        self, key: TaskKey, after: int | None, *, ends_in: float | None = None, last: bytes = b""
    ) -> AsyncGenerator[bytes, None]:
        """The stream as an async iterator of byte chunks (the ASGI path, tests);
        ``ends_in`` and ``last`` as for ``attach()``.

        Its sink holds one chunk: a consumer that does not take it falls
        behind and catches up from memory or the log, as a slow socket does.
        """
        sink = QueueSink()
        sub = self.attach(key, after, sink, ends_in=ends_in, last=last)
        try:
            async for chunk in sink.consume():
                yield chunk
        finally:
            self.detach(sub)

    def end(self, sub: Subscriber, last: bytes = b"") -> None:
        """End one subscriber's stream now, ``last`` written first (between two
        events: the hub writes whole events only)."""
        if sub.closed:
            return
        if last:
            sub.sink.write(last)
        sub.sink.end()
        self.detach(sub)

    def _end(self, sub: Subscriber, *, hint: bool = False) -> None:
        self.end(sub, retry_hint(RECONNECT_HINT_MS) if hint else b"")

    def _fall_behind(self, sub: Subscriber) -> None:
        """A live subscriber that cannot take more (or lost its place in memory)
        leaves the live set and catches up by itself once its sink drains."""
        catch_up = self._catch_up(sub, drain_first=True)
        sub.task = asyncio.create_task(catch_up, name=f"streaming-catch-up:{sub.key}")

    async def _start(self, sub: Subscriber, after: int | None) -> None:
        channel = sub.channel
        try:
            if self._closing:
                return self._end(sub, hint=True)
            await self._transport.ready(sub.key)
            await self._seed(channel, sub.key)
            latest = channel.events[-1] if channel.events else None
            if after is None:  # the seed's rule: the latest event at once, then the rest
                sub.after = latest.seq - 1 if latest else 0
            elif _ended_by(latest, after):
                sub.after = after
                return self._end(sub)  # the client has seen the end already
            else:
                sub.after = after
                if after:
                    self.resumes += 1
        except Exception:
            logger.exception("Starting a stream of %s failed", sub.key)
            return self._end(sub, hint=True)
        await self._catch_up(sub)

    async def _catch_up(self, sub: Subscriber, *, drain_first: bool = False) -> None:
        """Send a subscriber what it misses, chunk by chunk, then make it live."""
        sink = sub.sink
        # The tasks of a mux share one sink: their catch-ups take turns, so a
        # client that reads nothing holds one chunk of them, not one per task.
        turn = getattr(sink, "turn", None) or contextlib.nullcontext()
        try:
            if drain_first and not await self._drained(sub):
                return
            while not self._closing:
                async with turn:
                    if sink.paused and not await self._drained(sub):
                        return
                    if not await self._catch_up_chunk(sub):
                        return
            self._end(sub, hint=True)
        except Exception:
            logger.exception("Streaming %s failed", sub.key)
            self._end(sub, hint=True)

    async def _catch_up_chunk(self, sub: Subscriber) -> bool:
        """Write the subscriber's next chunk; False once it is live or ended."""
        channel = sub.channel
        batch = self._from_memory(channel, sub.after)
        if batch is None:
            batch = await self._history.read(sub.key, sub.after, self._history_size)
            logged = bool(batch)
            if channel.events:  # it may have filled while we read the log
                first_in_memory = channel.events[0].seq
                batch = [e for e in batch if e.seq < first_in_memory]
                if not batch:
                    # A gap the log does not fill (persistence off), or
                    # memory caught up meanwhile: go on from memory,
                    # never back before what this client already has.
                    if sub.after < first_in_memory - 1 and not logged:
                        self.resumes_incomplete += 1  # nothing anywhere between: skipped
                    sub.after = max(sub.after, first_in_memory - 1)
                    return True
        if batch:
            data, sub.after, terminal, count = next(self._pieces(batch))
            # Held no longer than this write: a client that reads nothing
            # keeps one chunk in its socket's buffer, not a log batch.
            del batch
            sub.sink.write(data)
            self.delivered += count
            self.bytes_written += len(data)
            del data
            if terminal:
                self._end(sub)
                return False
            return True
        if channel.events and _ended_by(channel.events[-1], sub.after):
            self._end(sub)
            return False
        sub.task = None  # caught up: from now on _flush writes to it
        return False

    async def _drained(self, sub: Subscriber) -> bool:
        """Wait for the sink to accept data again; cut off a client that reads nothing."""
        try:
            async with asyncio.timeout(self.send_timeout):
                await sub.sink.drain()
            return True
        except TimeoutError:
            logger.info("Disconnecting a client of %s: it read nothing for %ss", sub.key, self.send_timeout)
            self.cut_off += 1
            sub.sink.abort()
            self.detach(sub)
            return False

    async def _seed(self, channel: Channel, key: TaskKey) -> None:
        """Load the task's recent events from the log into memory, once per channel.

        However many clients arrive at once (a thousand watchers of a task
        about to start), the log is read once, not once or twice per client.
        """
        if channel.seeded:
            return
        if channel.seeding is None:
            channel.seeding = asyncio.ensure_future(self._load_seed(channel, key))
        try:
            await asyncio.shield(channel.seeding)
        finally:
            if channel.seeding is not None and channel.seeding.done():
                channel.seeding = None

    async def _load_seed(self, channel: Channel, key: TaskKey) -> None:
        latest = await self._history.last(key)
        recent: list[Event] = []
        if latest is not None:
            recent = await self._history.read(
                key, max(0, latest.seq - self._history_size), self._history_size
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

    async def _look_for_a_missed_end(self, key: TaskKey, channel: Channel) -> None:
        """Once per keep-alive interval per idle task: did it end without us hearing?

        With Redis, a node that dies between writing a task's end to the log
        and sending it to Redis leaves remote watchers waiting forever. If the
        log has an end newer than memory, what memory misses is read from the
        log and delivered as if it had been published.
        """
        now = asyncio.get_running_loop().time()
        if now - channel.checked_at < self._keepalive:
            return
        channel.checked_at = now
        if not channel.seeded or (channel.events and channel.events[-1].terminal):
            return
        latest = await self._history.last(key)
        newest_here = channel.events[-1].seq if channel.events else 0
        if latest is None or not latest.terminal or latest.seq <= newest_here:
            return
        while not (channel.events and channel.events[-1].terminal):
            after = channel.events[-1].seq if channel.events else 0
            missed = await self._history.read(key, after, self._history_size)
            if not missed or self._channels.get(key) is not channel:
                break  # nothing more, or the channel was dropped (its clients left) meanwhile
            for event in missed:
                self._append(key, channel, event)

    def _from_memory(self, channel: Channel, after: int) -> list[Event] | None:
        """Events after ``after`` held in memory; None when older ones may be missing."""
        events = channel.events
        if not events:
            return [] if channel.seeded else None
        if events[0].seq > after + 1:
            return None
        return events[bisect_right(events, after, key=_seq) :]

    def _pieces(self, batch: list[Event]) -> Iterator[Piece]:
        """``batch`` as chunks of at most MAX_CHUNK_BYTES (an event is never split),
        each with its last seq, whether it ends the stream and its number of events."""
        parts: list[bytes] = []
        size = 0
        for event in batch:
            parts.append(event.sse)
            size += len(event.sse)
            if event.terminal:
                yield b"".join(parts), event.seq, True, len(parts)
                return
            if size >= self._max_chunk:
                yield b"".join(parts), event.seq, False, len(parts)
                parts, size = [], 0
        if parts:
            yield b"".join(parts), batch[-1].seq, False, len(parts)

    @property
    def closing(self) -> bool:
        return self._closing

    def close_subscriptions(self) -> None:
        """End every stream with a reconnect hint (the server is shutting down)."""
        self._closing = True
        for channel in list(self._channels.values()):
            for sub in list(channel.subs):
                self._end(sub, hint=True)  # a catch-up task in progress is cancelled
        for mux in {mux for following in self._feeds.values() for mux in following}:
            mux.sink.write(retry_hint(RECONNECT_HINT_MS))  # a feed with no task running now
            mux.end()
