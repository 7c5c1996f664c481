"""One run of one task: its event numbering, its sending, its end, its wake-ups."""

import asyncio
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async

from ..events import Event, build_payload
from ..keys import TaskKey
from . import store

if TYPE_CHECKING:
    from .runner import Runner


class TaskRun:
    """One run of one task: its event numbering, its coroutine, its wake-ups."""

    def __init__(self, runner: "Runner", claim: store.Claim):
        self.runner = runner
        self.instance = claim.instance
        self.model = type(claim.instance)
        self.pk = claim.instance.pk
        self.key = TaskKey.of(self.model, self.pk)
        self.next_seq = claim.first_seq
        self.reserved_to = claim.reserved_to
        self.cancel_requested = False
        self.lease_lost = False
        self.task: asyncio.Task[None] | None = None
        self._reserve_lock = asyncio.Lock()
        self._row_changed = asyncio.Event()
        self._terminal: Event | None = None

    async def send(self, event_type: str, data: dict[str, Any] | None) -> Event:
        event = await self.number(event_type, data)
        await self.runner.hub.publish(self.key, event)
        if self.model.persist_events:
            self.runner.eventlog.append(self.key, event)
        return event

    async def number(self, event_type: str, data: dict[str, Any] | None) -> Event:
        """The next event of this task, numbered and encoded but not yet sent."""
        if self.next_seq > self.reserved_to:
            async with self._reserve_lock:
                if self.next_seq > self.reserved_to:
                    upto = self.next_seq + store.SEQ_BLOCK - 1
                    if not await sync_to_async(store.reserve_seq)(
                        self.model, self.pk, self.runner.owner, upto
                    ):
                        # Another runner owns the task now: numbering on would
                        # collide with its numbers.
                        self.lease_lost = True
                        raise asyncio.CancelledError
                    self.reserved_to = upto
        seq = self.next_seq
        self.next_seq += 1
        return Event(
            seq,
            event_type,
            build_payload(data, task_id=self.pk, model_name=self.model.stream_name()),
        )

    async def end(self, status: str, event_type: str, data: dict[str, Any] | None, **fields: Any) -> bool:
        """Write the terminal event with the row's final state, then announce it.

        Durable first: a client arriving at any moment finds the end either
        in the log or live, never in neither. Safe to call again after a
        failure (the event keeps its number). False: the lease was lost, and
        nothing is announced (the new owner ends the task).
        """
        if self._terminal is None:
            self._terminal = await self.number(event_type, data)
        await self.runner.eventlog.flush()
        won = await sync_to_async(store.finish)(
            self.model, self.pk, self.runner.owner, status, self._terminal, **fields
        )
        if won:
            await self.runner.hub.publish(self.key, self._terminal)
        return won

    def row_changed(self) -> None:
        self._row_changed.set()

    async def wait_for_row_change(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._row_changed.wait()
        except TimeoutError:
            pass
        self._row_changed.clear()
