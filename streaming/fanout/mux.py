"""Several tasks on one connection: the multiplexed stream (``GET /stream/?task=...&feed=...``).

A browser holds about six HTTP/1.1 connections per origin, so a page that
follows twenty tasks cannot open twenty streams. A ``Mux`` puts them on one
sink: each task is an ordinary hub subscriber (its own cursor, catch-up and
live writes) whose sink is a ``TaskView`` that writes through to the shared
one. The hub writes whole events only, so events of different tasks
interleave at event boundaries, and each keeps its own bytes: the ``id:`` is
the task's own seq and the data names the task (``_model``, ``_task_id``).

A feed (``feed=<Model>``) adds every task of a model that starts running
while the connection lasts: the runner that claims a task announces it
(``Hub.started``, through the transport to every node), and each mux that
follows the model attaches it. A feed also reads the model's running tasks
from the database: when it opens, and again whenever this node's channel for
announcements was lost and is back (``Hub.announcements_lost``), since an
announcement sent meanwhile never arrives.
"""

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..keys import TaskKey
from .sinks import Sink

if TYPE_CHECKING:
    from .hub import Hub, RunningTask, Subscriber

# Ended tasks a feed remembers, so a late announcement of one (Redis delivers
# a node's own announcements back to it) does not send its end again.
FORGET_AFTER = 10_000
MAX_FEED_START = 1000  # running tasks a feed reads, per model (the most recently started)


class TaskView:
    """One task's sink inside a mux: writes go to the shared sink."""

    __slots__ = ("key", "mux", "subscriber")

    def __init__(self, mux: "Mux", key: TaskKey) -> None:
        self.mux = mux
        self.key = key
        self.subscriber: Subscriber | None = None

    @property
    def paused(self) -> bool:
        return self.mux.sink.paused

    @property
    def turn(self) -> asyncio.Lock:
        """Held by one catch-up of the mux at a time (the hub's ``_catch_up``)."""
        return self.mux.turn

    def write(self, data: bytes) -> None:
        self.mux.sink.write(data)

    async def drain(self) -> None:
        await self.mux.sink.drain()

    def end(self) -> None:
        self.mux.view_ended(self)

    def abort(self) -> None:
        self.mux.abort()


class Mux:
    """The tasks (and model feeds) of one multiplexed connection."""

    def __init__(
        self, hub: "Hub", sink: Sink, *, feeds: frozenset[str] = frozenset(), ends_in: float | None = None
    ) -> None:
        self.hub = hub
        self.sink = sink
        self.feeds = feeds  # model labels whose newly started tasks join
        self.views: dict[TaskKey, TaskView] = {}
        self.turn = asyncio.Lock()
        self.ended: OrderedDict[TaskKey, None] = OrderedDict()
        self.closed = False
        self._expiry: asyncio.TimerHandle | None = None
        self._last = b""
        self.opened_at = time.time()  # compared with runs' claim times (started_at)
        if ends_in is not None:
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, ends_in), self._expire)

    def expire_with(self, last: bytes) -> None:
        """What to write when access runs out (before the stream ends)."""
        self._last = last

    def add(self, key: TaskKey, after: int | None) -> None:
        """Stream ``key`` on this connection from after ``after`` (None: its latest event first)."""
        if self.closed or key in self.views or key in self.ended:
            return
        view = TaskView(self, key)
        self.views[key] = view
        view.subscriber = self.hub.attach(key, after, view)

    def rejoin(self, task: "RunningTask") -> None:
        """Stream a task found running in the database, unless this connection
        has it already. A first run that began after the feed opened starts
        from its first event (seq 1), as its announcement would have had it;
        any other starts from its latest event."""
        if self.closed or task.key in self.views or task.key in self.ended:
            return
        fresh = task.attempt == 1 and task.started_at is not None and task.started_at >= self.opened_at
        self.add(task.key, 0 if fresh else None)

    def view_ended(self, view: TaskView) -> None:
        """The hub ended one task's part: at its terminal event, or for a reason
        that ends the connection (shutdown, an error): then the client
        reconnects with its cursors."""
        if self.closed:
            return
        sub = view.subscriber
        if self.views.get(view.key) is view:
            del self.views[view.key]
        if sub is None or not _at_its_end(sub):
            return self.end()
        self.ended[view.key] = None
        if len(self.ended) > FORGET_AFTER:
            self.ended.popitem(last=False)
        if not self.views and not self.feeds:
            self.end()

    def _expire(self) -> None:
        self._expiry = None
        if not self.closed and self._last:
            self.sink.write(self._last)
        self.end()

    def end(self) -> None:
        """End the connection after what is buffered."""
        if self.closed:
            return
        self.close()
        self.sink.end()

    def abort(self) -> None:
        """Cut the connection off (its client reads nothing)."""
        if self.closed:
            return
        self.close()
        self.sink.abort()

    def close(self) -> None:
        """Forget every subscriber (the connection is gone or ending)."""
        if self.closed:
            return
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.hub.unfollow(self)
        views, self.views = self.views, {}
        for view in views.values():
            if view.subscriber is not None:
                self.hub.detach(view.subscriber)


def _at_its_end(sub: "Subscriber") -> bool:
    """Was the task's terminal event the last thing this subscriber was sent?"""
    events = sub.channel.events
    return bool(events) and events[-1].terminal and sub.after >= events[-1].seq
