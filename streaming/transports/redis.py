"""The Redis transport: many processes and machines share one Redis.

- Each task's recent events live in a Redis Stream, ``streaming:events:<key>``,
  whose entry ids are the events' sequence numbers (``<seq>-0``), so any node
  can serve late joiners and ``Last-Event-ID`` resumes with one XRANGE. The
  stream is capped (``REDIS_STREAM_MAXLEN``, approximate) and expires
  ``REDIS_STREAM_TTL`` seconds after the task's terminal event; older events
  come from the event log in the database, the durable record.
- A node reads Redis once for all the tasks its clients watch: one blocking
  XREAD over every watched stream, on one connection, whatever the number of
  clients. Events are fanned out locally by the node's hub (one shared
  list per task, a cursor per client).
- Runner wake-ups (a task was created, started or cancelled anywhere) go
  through the pub/sub channel ``streaming:<db>:wake``; announcements of
  claimed tasks (for the feeds of multiplexed streams) through
  ``streaming:<db>:started`` (``<db>``: the URL's database number).
"""

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

try:
    import redis
    import redis.asyncio as aioredis
    from redis.connection import parse_url
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "STREAMING['BROKER_URL'] names Redis, but redis-py is not installed: "
        "pip install 'django-streaming-coordinator[redis]'"
    ) from exc

from ..events import Event
from ..keys import TaskKey
from .base import History, Transport

if TYPE_CHECKING:
    from redis.typing import KeyT, StreamIdT

    from ..conf import StreamingSettings

logger = logging.getLogger(__name__)

STREAM_PREFIX = "streaming:events:"
READ_BLOCK_MS = 100  # a newly watched task joins the shared read within this
ANNOUNCE_RETRY_AFTER = 0.5  # seconds before a failed announcement is sent again (once)
REDIS_POOL_SIZE = 32  # connections per node for publishing and history reads


def stream_name(key: TaskKey) -> str:
    return f"{STREAM_PREFIX}{key.label}:{key.pk}"


# Pub/sub channels belong to the whole Redis server, not to one of its
# databases: named after the database, so that deployments sharing a server
# (staging on db 1, production on db 0) never wake or feed each other.
def wake_channel(url: str) -> str:
    return f"streaming:{_database(url)}:wake"


def started_channel(url: str) -> str:
    """Announcements of claimed tasks: "<label>:<pk> <seq before its run's first event>", one per line."""
    return f"streaming:{_database(url)}:started"


def _database(url: str) -> int:
    return int(parse_url(url).get("db") or 0)


def wake_from_outside(url: str) -> None:
    """A one-off wake-up from a process that runs no node (create_task, shell)."""
    try:
        with redis.Redis.from_url(url, socket_timeout=2) as client:
            client.publish(wake_channel(url), b"1")
    except RedisError as exc:
        logger.warning("Could not wake the runners through Redis (%s); they poll", exc)


# Our clients keep redis-py's defaults: replies are bytes, in RESP2's shapes
# (legacy_responses). redis-py's annotations cover every setting (decoded str,
# RESP3 dicts), so replies are narrowed to these with cast().
Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry: (b"<seq>-0", {b"t": type, b"p": payload})
XReadReply = list[tuple[bytes, list[Entry]]] | None  # [(stream name, entries), ...]


def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    return Event(int(entry_id.split(b"-", 1)[0]), fields[b"t"].decode(), fields[b"p"].decode())


class RedisHistory:
    """Recent events from the Redis Stream, older ones from the event log."""

    def __init__(self, transport: "RedisTransport", log: History):
        self._transport = transport
        self._log = log

    async def read(self, key: TaskKey, after: int, limit: int) -> list[Event]:
        name = stream_name(key)
        try:
            entries = cast(
                "list[Entry]", await self._transport.redis.xrange(name, f"({after}-0", "+", count=limit)
            )
        except (RedisError, OSError) as exc:
            # Redis is down: the event log has every event that was written;
            # a finished task's whole history among them.
            _unreachable("reading history from Redis; reading the event log instead", exc)
            return await self._log.read(key, after, limit)
        recent = [_event(i, f) for i, f in entries]
        if recent and recent[0].seq == after + 1:
            return recent
        # The stream does not reach back to `after` (capped, expired, or a
        # numbering gap): take what the log has below the stream's start.
        logged = await self._log.read(key, after, limit)
        if recent:
            logged = [e for e in logged if e.seq < recent[0].seq]
        return (logged + recent)[:limit]

    async def last(self, key: TaskKey) -> Event | None:
        try:
            entries = cast(
                "list[Entry]", await self._transport.redis.xrevrange(stream_name(key), "+", "-", count=1)
            )
        except (RedisError, OSError) as exc:
            _unreachable("reading history from Redis; reading the event log instead", exc)
            return await self._log.last(key)
        if entries:
            return _event(*entries[0])
        return await self._log.last(key)


class RedisTransport(Transport):
    shared = True

    def __init__(self, url: str, *, settings: "StreamingSettings") -> None:
        self.url = url
        self.wake_channel = wake_channel(url)
        self.started_channel = started_channel(url)
        self._maxlen = settings.REDIS_STREAM_MAXLEN
        self._ttl = int(settings.REDIS_STREAM_TTL)
        # A burst of new subscribers queues for a connection instead of
        # failing with "Too many connections" (seen at 1,000 at once).
        self.redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=REDIS_POOL_SIZE, timeout=30
            )
        )
        self._reader = aioredis.Redis.from_url(url)  # its own connection: XREAD blocks it
        self._watched: set[TaskKey] = set()  # tasks with local subscribers
        self._cursors: dict[TaskKey, bytes] = {}  # key -> last stream id read
        self._watch_changed = asyncio.Event()
        self._outbox: list[tuple[TaskKey, Event]] = []
        self._outbox_ready = asyncio.Event()
        self._sending = 0  # events of the outbox batch in flight
        self._tasks: list[asyncio.Task[None]] = []
        self._announcing: set[asyncio.Future[None]] = set()  # held: the loop keeps weak references only
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.redis.ping()
        self._tasks = [
            asyncio.create_task(self._read_streams(), name="streaming-redis-read"),
            asyncio.create_task(self._listen_wakeups(), name="streaming-redis-wake"),
            asyncio.create_task(self._send_outbox(), name="streaming-redis-send"),
        ]

    def history(self, log: History) -> History:
        return RedisHistory(self, log)

    @property
    def backlog(self) -> int:
        return len(self._outbox) + self._sending

    async def check(self) -> None:
        await self.redis.ping()

    async def sent_after(self, key: TaskKey, after: int, limit: int) -> list[Event]:
        name = stream_name(key)
        entries = cast("list[Entry]", await self.redis.xrange(name, f"({after}-0", "+", count=limit))
        return [_event(i, f) for i, f in entries]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._announcing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.flush()
        except (RedisError, OSError):
            logger.warning("Redis unreachable at shutdown; %d events not sent", len(self._outbox))
        await self.redis.aclose(close_connection_pool=True)
        await self._reader.aclose()

    # -- runner side --------------------------------------------------------------

    def publish(self, key: TaskKey, event: Event) -> None:
        # In order, in pipelined batches, so a chatty task is not held to one
        # round trip per event.
        self._outbox.append((key, event))
        self._outbox_ready.set()

    async def _send_outbox(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            if not batch:
                continue
            self._sending = len(batch)
            try:
                await self._xadd(batch)
            except asyncio.CancelledError:
                self._outbox[:0] = batch
                raise
            except (RedisError, OSError) as exc:
                logger.warning("Sending %d events to Redis failed (%s); retrying", len(batch), exc)
                self._outbox[:0] = batch
                await asyncio.sleep(0.5)
                self._outbox_ready.set()
            finally:
                self._sending = 0

    async def _xadd(self, batch: Iterable[tuple[TaskKey, Event]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, event in batch:
                name = stream_name(key)
                pipe.xadd(
                    name,
                    {"t": event.type, "p": event.payload},
                    id=f"{event.seq}-0",
                    maxlen=self._maxlen,
                    approximate=True,
                )
                if event.terminal:
                    pipe.expire(name, self._ttl)
            for result in await pipe.execute(raise_on_error=False):
                if isinstance(result, ResponseError):
                    # One bad entry (already there, or a key of the wrong type)
                    # must not hold back every later event: log it, go on.
                    logger.warning("Redis refused an event: %s", result)

    async def flush(self) -> None:
        """Send what publish() queued (used on shutdown)."""
        batch, self._outbox = self._outbox, []
        if batch:
            await self._xadd(batch)

    def wake_all(self) -> None:
        # Called from any thread (on_commit callbacks run in the ORM's).
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self.wake()).add_done_callback(_log_failure)
            )

    async def wake(self) -> None:
        await self.redis.publish(self.wake_channel, b"1")

    def announce(self, starts: list[tuple[TaskKey, int]]) -> None:
        if starts:
            payload = "\n".join(f"{key} {after}" for key, after in starts).encode()
            announcing = asyncio.ensure_future(self._announce(payload))
            self._announcing.add(announcing)
            announcing.add_done_callback(self._announcing.discard)

    async def _announce(self, payload: bytes) -> None:
        try:
            await self.redis.publish(self.started_channel, payload)
            return
        except (RedisError, OSError) as exc:
            # Once more, shortly, on a new connection: a blip between this node
            # and Redis leaves the other nodes subscribed, so no re-read of theirs
            # would make up for it. An outage long enough to fail twice drops
            # their subscriptions too, and they re-read when back.
            logger.warning("Announcing started tasks through Redis failed (%s); trying once more", exc)
        await asyncio.sleep(ANNOUNCE_RETRY_AFTER)
        try:
            await self.redis.publish(self.started_channel, payload)
        except (RedisError, OSError) as exc:
            logger.warning(
                "Announcing started tasks through Redis failed again (%s); feeds on other nodes "
                "still subscribed show them only once their clients reconnect",
                exc,
            )

    def _announced(self, payload: bytes) -> None:
        try:
            starts = []
            for line in payload.decode().split("\n"):
                key, _, after = line.rpartition(" ")
                starts.append((TaskKey.parse(key), int(after)))
        except ValueError:  # not ours: nothing to announce
            logger.warning("Ignoring a malformed announcement on %s", self.started_channel)
            return
        self.receiver.announced(starts)

    async def _listen_wakeups(self) -> None:
        # A confirmation from now on is a resubscription (after a failure, or
        # redis-py reconnecting by itself): messages may have gone by unheard.
        again = False
        started = self.started_channel.encode()
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.wake_channel, self.started_channel)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        if message["channel"] == started:
                            self._announced(message["data"])
                        else:
                            self.on_wake()
                    elif message["type"] == "subscribe" and message["channel"] == started:
                        if again:
                            # Redis confirmed it: announcements from now on arrive.
                            # Pub/sub keeps nothing for the absent, so what was sent
                            # while we were away is read from the database instead
                            # (a claim commits before it is announced).
                            self.receiver.announcements_lost()
                            self.on_wake()  # a wake-up may have gone by too: look for work now
                        again = True
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                logger.warning("Lost the Redis wake-up channel (%s); reconnecting", exc)
                await asyncio.sleep(1)
            finally:
                again = True
                await pubsub.aclose()  # give its connection back to the pool

    # -- HTTP side ----------------------------------------------------------------------

    def watch(self, key: TaskKey) -> None:
        self._watched.add(key)

    async def ready(self, key: TaskKey) -> None:
        if key not in self._cursors:
            # Read from the stream's current end: what came before reaches the
            # subscriber through its history read.
            try:
                top = cast("list[Entry]", await self.redis.xrevrange(stream_name(key), "+", "-", count=1))
            except (RedisError, OSError) as exc:
                # Redis is down: the stream opens from the log; live events
                # arrive once the reader gets through (from the start of the
                # stream: the hub drops what it already holds).
                _unreachable("finding where a task's Redis stream ends", exc)
                top = []
            # Another subscription of this key may have registered it meanwhile,
            # and the reader moved on from there: never move a cursor forward.
            if key in self._watched and key not in self._cursors:
                cursor = top[0][0] if top else b"0-0"
                held = self.receiver.held_seq(key)
                # Memory already holds this task (its run was here until
                # another node took over): read on from where memory stops,
                # not from the top, so nothing between is skipped.
                if held is not None and held < int(cursor.split(b"-", 1)[0]):
                    cursor = f"{held}-0".encode()
                self._cursors[key] = cursor
                self._watch_changed.set()

    def unwatch(self, key: TaskKey) -> None:
        self._watched.discard(key)
        self._cursors.pop(key, None)

    async def _read_streams(self) -> None:
        """One XREAD for every watched task; events go to the local channels."""
        while True:
            if not self._cursors:
                self._watch_changed.clear()
                await self._watch_changed.wait()
                continue
            streams: dict[KeyT, StreamIdT] = {
                stream_name(key): cursor for key, cursor in self._cursors.items()
            }
            try:
                replies = cast(XReadReply, await self._reader.xread(streams, count=1000, block=READ_BLOCK_MS))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                logger.warning("Reading the Redis streams failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for name, entries in replies or ():
                key = TaskKey.parse(name.decode()[len(STREAM_PREFIX) :])
                if key not in self._cursors:
                    continue  # nobody here watches it any more
                for entry_id, fields in entries:
                    self.receiver.deliver(key, _event(entry_id, fields))
                    self._cursors[key] = entry_id


_warned_at = 0.0


def _unreachable(doing: str, exc: BaseException) -> None:
    """One line, at most every 10 s: Redis down is one problem, not one per request."""
    global _warned_at
    now = time.monotonic()
    if now - _warned_at >= 10:
        _warned_at = now
        logger.warning("Redis unreachable (%s) %s", exc, doing)


def _log_failure(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("Redis publish (a wake-up) failed: %s", task.exception())
