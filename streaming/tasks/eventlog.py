"""The batched writer of the event log: one bulk insert per tick, off the hot path."""

import asyncio
import logging
import time

from asgiref.sync import sync_to_async

from ..events import Event
from ..keys import TaskKey
from . import store

logger = logging.getLogger(__name__)


class EventLog:
    def __init__(self, flush_interval: float, batch_size: int) -> None:
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self._pending: list[store.LogRow] = []
        self._lock = asyncio.Lock()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0  # events written since start (web/metrics.py reads these)
        self._waiting_since: float | None = None  # monotonic time the oldest pending event came
        self._writing = 0  # events of the batch being written
        self._writing_since: float | None = None  # when its oldest came

    @property
    def pending(self) -> int:
        """Events appended and not yet written (the batch being written included)."""
        return len(self._pending) + self._writing

    def lag(self) -> float:
        """How long the oldest event not yet written has waited, in seconds (0: none waits)."""
        since = [t for t in (self._waiting_since, self._writing_since) if t is not None]
        return time.monotonic() - min(since) if since else 0.0

    def append(self, key: TaskKey, event: Event, fence: store.Fence | None = None) -> None:
        """Queue ``event`` for the log; with a ``fence``, only while that run holds the task."""
        if not self._pending:
            self._waiting_since = time.monotonic()
        self._pending.append((key, event, fence))
        if len(self._pending) >= self.batch_size:
            self._full.set()

    async def flush(self) -> None:
        """Write everything appended before this call."""
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            self._writing_since, self._waiting_since = self._waiting_since, None
            self._writing = len(batch)
            written = 0
            try:
                for start in range(0, len(batch), self.batch_size):
                    part = batch[start : start + self.batch_size]
                    dropped = await sync_to_async(store.write_log)(part)
                    written = start + self.batch_size
                    self._writing -= len(part)
                    self.written += len(part) - len(dropped)
                    for key, event, fence in dropped:
                        assert fence is not None  # only fenced rows are dropped
                        logger.warning(
                            "Not logging event %d of %s: attempt %d no longer holds the task",
                            event.seq,
                            key,
                            fence.attempt,
                        )
            except BaseException:
                # Failed or cancelled: keep what is not surely written for the
                # next flush (a write that did land is skipped as a duplicate).
                self._pending[:0] = batch[written:]
                if self._writing_since is not None:  # those events have waited since then
                    self._waiting_since = self._writing_since
                raise
            finally:
                self._writing = 0
                self._writing_since = None

    async def read(self, key: TaskKey, after: int, limit: int) -> list[Event]:
        await self.flush()
        return await sync_to_async(store.read_events)(key, after, limit)

    async def last(self, key: TaskKey) -> Event | None:
        await self.flush()
        return await sync_to_async(store.last_event)(key)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="streaming-eventlog")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.flush_interval):
                    await self._full.wait()
            except TimeoutError:
                pass
            self._full.clear()
            try:
                await self.flush()
            except Exception:
                logger.exception("Writing the event log failed; retrying")
                await sync_to_async(store.close_broken_connections)()
                await asyncio.sleep(1)
