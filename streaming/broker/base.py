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
    def subscribe(self, key: str, after: int | None) -> AsyncIterator[bytes]:
        """SSE bytes of task ``key``: the events after ``after``, then live ones.

        ``after=None`` starts with the latest event. Yields coalesced chunks
        of encoded events, keep-alive comments when idle, and ends after the
        task's terminal event or when the broker closes.
        """

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
