"""The broker interface: as small as the runner and the HTTP layer need."""

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable

from ..events import Event


class Broker(ABC):
    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def stop(self) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    async def publish(self, key: str, event: Event) -> None:
        """Deliver ``event`` (already numbered) to every subscriber of ``key``."""

    @abstractmethod
    def attach(self, key: str, after: int | None, sink):
        """Stream task ``key`` into ``sink`` (see memory.Sink): the events after
        ``after`` (None: the latest one first), then live ones, keep-alive
        comments when idle; the sink is ended after the task's terminal event
        or when the broker closes. Returns a handle for ``detach()``.
        """

    @abstractmethod
    def detach(self, subscriber) -> None:
        """Stop streaming to a subscriber's sink (its client went away)."""

    @abstractmethod
    def subscribe(self, key: str, after: int | None) -> AsyncIterator[bytes]:
        """``attach()`` as an async iterator of SSE byte chunks."""

    def run_stopped(self, key: str) -> None:  # noqa: B027 - optional hook
        """This node's run of ``key`` is over (ended, or lost its lease)."""

    @abstractmethod
    def close_subscriptions(self) -> None:
        """End every open subscription (the server is shutting down)."""

    @abstractmethod
    def wake_runners(self) -> None:
        """Tell runners that rows changed (a task was created, started, cancelled)."""

    @abstractmethod
    async def wake(self) -> None:
        """wake_runners() from the event loop, done when the wake-up is sent."""

    @abstractmethod
    def on_wake(self, callback: Callable[[], None]) -> None:
        """Register a runner's callback for wake_runners()."""
