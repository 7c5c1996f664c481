"""The in-process transport: one process, nothing to carry (the embedded default)."""

from ..events import Event
from ..keys import TaskKey
from .base import Transport


class LocalTransport(Transport):
    shared = False

    def publish(self, key: TaskKey, event: Event) -> None:
        pass  # the hub has delivered it to every subscriber there is

    def wake_all(self) -> None:
        self.on_wake()

    async def wake(self) -> None:
        self.on_wake()
