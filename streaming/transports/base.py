"""The transport between processes: the small interface behind the local fanout hub.

The hub (``fanout/hub.py``) is the same in every mode: per-task channels,
cursors, coalesced writes, catch-up, keep-alives. A transport carries what
one process must tell the others: events published here, events published
elsewhere that local clients watch, recent history, and runner wake-ups.
A new engine (NATS, PostgreSQL LISTEN/NOTIFY, ...) is one module that
implements ``Transport``.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Protocol

from ..events import Event
from ..keys import TaskKey


class History(Protocol):
    """Where a subscriber that is behind memory reads past events."""

    async def read(self, key: TaskKey, after: int, limit: int) -> list[Event]:
        """Up to ``limit`` events of ``key`` after seq ``after``, in order."""
        ...

    async def last(self, key: TaskKey) -> Event | None:
        """The latest event of ``key``."""
        ...


class Receiver(Protocol):
    """The local hub, as a transport sees it."""

    def deliver(self, key: TaskKey, event: Event) -> None:
        """An event of ``key`` from another process, for the local subscribers."""
        ...

    def held_seq(self, key: TaskKey) -> int | None:
        """The newest seq of ``key`` this process holds in memory (None: none)."""
        ...

    def announced(self, starts: list[tuple[TaskKey, int]]) -> None:
        """Tasks that started running on another node, each with the seq after
        which its run numbers events (for the feeds)."""
        ...

    def announcements_lost(self) -> None:
        """Announcements may have been missed (the channel was down and is back):
        the feeds re-read what runs."""
        ...


class Transport(ABC):
    shared: ClassVar[bool] = False  # reaches other processes (so --workers makes sense)
    receiver: Receiver  # set by bind()
    on_wake: Callable[[], None]  # set by bind()

    def bind(self, receiver: Receiver, on_wake: Callable[[], None]) -> None:
        """Where remote events go, and what a wake-up calls (thread-safe callable)."""
        self.receiver = receiver
        self.on_wake = on_wake

    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def stop(self) -> None:  # noqa: B027 - optional hook
        pass

    def history(self, log: History) -> History:
        """What catch-up reads come from, given the event log (default: the log)."""
        return log

    @property
    def backlog(self) -> int:
        """Events published here and not yet handed to the broker (the metrics' outbox backlog)."""
        return 0

    async def check(self) -> None:  # noqa: B027 - optional hook
        """Raise if the broker cannot be reached now (readiness)."""

    async def sent_after(self, key: TaskKey, after: int, limit: int) -> list[Event]:
        """Events of ``key`` after ``after`` that reached the broker (not the log):
        what a dead run sent before it died. Raises if the broker cannot say."""
        return []

    @abstractmethod
    def publish(self, key: TaskKey, event: Event) -> None:
        """Carry an event published here to the other processes (local delivery is the hub's)."""

    def announce(self, starts: list[tuple[TaskKey, int]]) -> None:  # noqa: B027 - optional hook
        """Tell the other processes these tasks started running here (the hub has told its own)."""

    def watch(self, key: TaskKey) -> None:  # noqa: B027 - optional hook
        """This process has its first subscriber of ``key``: deliver its remote events."""

    async def ready(self, key: TaskKey) -> None:  # noqa: B027 - optional hook
        """Awaited before a new subscriber's first read (remote delivery has begun)."""

    def unwatch(self, key: TaskKey) -> None:  # noqa: B027 - optional hook
        """This process's last subscriber of ``key`` left."""

    @abstractmethod
    def wake_all(self) -> None:
        """Thread-safe: wake the runners of every process this transport reaches."""

    @abstractmethod
    async def wake(self) -> None:
        """``wake_all()`` from the event loop, done when the wake-up is sent."""
