"""One run of one task: its event numbering, its sending, its end, its wake-ups."""

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async

from ..events import Event, build_payload
from ..keys import TaskKey
from . import store

if TYPE_CHECKING:
    from .runner import Runner

logger = logging.getLogger(__name__)


class LeaseLost(asyncio.CancelledError):
    """This run can no longer prove it holds its task: it stops, sending nothing more.

    Raised inside ``process()`` by ``send_event()`` and ``check_lease()``. It is
    a ``CancelledError``, so ``except Exception`` does not swallow it; let it
    propagate (clean up in ``finally``). The task is another node's now, or
    will be once its lease runs out there.
    """


class TaskRun:
    """One run of one task: its event numbering, its coroutine, its wake-ups, its lease.

    ``deadline`` (this node's monotonic clock): the run may send events until
    then. The runner moves it on with each lease renewal and cancels the run
    when it passes (``hold_until``); a run outside a runner's care (the
    testing helpers) has none.
    """

    def __init__(self, runner: "Runner", claim: store.Claim):
        self.runner = runner
        self.instance = claim.instance
        self.model = type(claim.instance)
        self.pk = claim.instance.pk
        self.key = TaskKey.of(self.model, self.pk)
        self.attempt: int = claim.instance.attempts  # the fencing number of this run
        self.fence = store.Fence(self.model, self.pk, runner.owner, self.attempt)
        self.next_seq = claim.first_seq
        self.reserved_to = claim.reserved_to
        self.cancel_requested = False
        self.lease_lost = False
        self.deadline = math.inf
        self.began = time.monotonic()  # claimed (for its duration in logs and metrics)
        self.task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._reserve_lock = asyncio.Lock()
        self._row_changed = asyncio.Event()
        self._terminal: Event | None = None

    async def send(self, event_type: str, data: dict[str, Any] | None) -> Event:
        event = await self.number(event_type, data)
        self.ensure_lease()  # checked last: nothing between this and the event going out awaits
        await self.runner.hub.publish(self.key, event)
        if self.model.persist_events:
            self.runner.eventlog.append(self.key, event, self.fence)
        return event

    # -- the lease ---------------------------------------------------------------

    def hold_until(self, deadline: float) -> None:
        """The lease is proven until ``deadline`` (time.monotonic()); past it the run is cancelled."""
        self.deadline = deadline
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_at(loop.time() + (deadline - time.monotonic()), self._lease_ran_out)

    def release(self) -> None:
        """The run is over: no watchdog any more."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    @property
    def ending(self) -> bool:
        """Its end is being written (from then on the row's fate is the end's)."""
        return self._terminal is not None

    def ensure_lease(self) -> None:
        """Raise ``LeaseLost`` unless the lease is still proven (a process
        resumed after a pause past its deadline stops here)."""
        if self.lease_lost or time.monotonic() >= self.deadline:
            self.lose("its lease could not be renewed in time")
            raise LeaseLost(f"{self.key}: the lease of attempt {self.attempt} is lost")

    async def check_lease(self) -> float:
        """Prove the lease now, with a renewal in the database; the seconds it
        is proven for from here. ``LeaseLost`` if it cannot be proven."""
        self.ensure_lease()
        began = time.monotonic()
        held = await sync_to_async(store.renew_lease)(self.fence, self.runner.settings.LEASE_SECONDS)
        if not held:
            self.lose("another node holds the task")
            raise LeaseLost(f"{self.key}: attempt {self.attempt} no longer holds the task")
        if self.deadline != math.inf:
            self.hold_until(began + self.runner.lease_span)
        self.ensure_lease()  # the renewal itself may have taken too long
        return self.deadline - time.monotonic()

    def _lease_ran_out(self) -> None:
        self._watchdog = None
        if self.task is not None and not self.task.done() and not self.lease_lost:
            self.lose("its lease could not be renewed in time")
            self.task.cancel()

    def lose(self, why: str) -> None:
        if not self.lease_lost:
            self.lease_lost = True
            logger.warning(
                "Lost the lease of %s (attempt %d): %s; stopping it here, sending nothing more",
                self.key,
                self.attempt,
                why,
            )

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
                        self.lose("another node holds the task")
                        raise LeaseLost(f"{self.key}: attempt {self.attempt} no longer holds the task")
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
            self.model, self.pk, self.runner.owner, status, self._terminal, attempt=self.attempt, **fields
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
