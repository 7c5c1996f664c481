"""The runner: the one place that starts, cancels, finishes and recovers tasks."""

import asyncio
import logging
import time
import traceback
from typing import TYPE_CHECKING, Any, Protocol

from asgiref.sync import sync_to_async
from django.utils import timezone

from ..conf import lease_margin
from ..events import CANCELLED, COMPLETE, ERROR, RETRY, to_json_value
from ..keys import TaskKey
from ..models import Recovery, Status, StreamTask
from . import store, wake
from .registry import stream_models
from .run import TaskRun

if TYPE_CHECKING:
    from ..conf import StreamingSettings
    from ..fanout.hub import Hub
    from ..transports.base import Transport
    from .eventlog import EventLog

logger = logging.getLogger(__name__)

LOG_WAIT_EVERY = 5.0  # seconds between "still waiting for ..." lines of a graceful shutdown

# How a run ended, besides the row's final statuses (completed, failed, cancelled):
HANDED_BACK = "handed_back"  # the server stopped under it; pending again for another runner
LOST = "lost"  # its lease was lost: another node owns the task now


class RunObserver(Protocol):
    """Told of each task this runner claims, ends and recovers (web/metrics.py); a
    few calls per task, none per event."""

    def claimed(self, run: TaskRun, waited: float | None) -> None:
        """``waited``: seconds from the row's creation to this claim (a first attempt), else None."""

    def ended(self, run: TaskRun, outcome: str, seconds: float) -> None:
        """``outcome``: the final status written, HANDED_BACK or LOST; ``seconds`` since the claim."""

    def recovered(self, model: type[StreamTask], requeued: bool) -> None:
        """A task whose server died was taken over: requeued (RETRY) or failed."""


class Runner:
    def __init__(
        self,
        *,
        hub: "Hub",
        transport: "Transport",
        eventlog: "EventLog",
        settings: "StreamingSettings",
        owner: str | None = None,
    ) -> None:
        self.hub = hub
        self.transport = transport
        self.eventlog = eventlog
        self.settings = settings
        self.owner = owner or store.new_owner_id()
        # How long a claim or renewal proves a lease for, on this node's clock:
        # a run stops that long after its last renewal began, before any other
        # node may take its task over (LEASE_SECONDS after that renewal).
        self.lease_span = settings.LEASE_SECONDS - lease_margin(settings)
        self.runs: dict[TaskKey, TaskRun] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._hurry = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._step_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.observer: RunObserver | None = None

    # -- wake-ups -----------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def wake_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def row_changed_threadsafe(self, key: TaskKey) -> None:
        run = self.runs.get(key)
        if run is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(run.row_changed)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_task = asyncio.create_task(self._main(), name="streaming-runner")
        self._watch_task = asyncio.create_task(
            wake.watch_database(self.wake, shared_transport=self.transport.shared),
            name="streaming-watch-database",
        )

    async def stop(self, grace: float = 0.0) -> None:
        """Stop claiming; give running tasks ``grace`` s, then interrupt the rest.

        The loop is not cancelled mid-step: a claim already sent to the
        database would commit with nobody to run (or hand back) its tasks.
        """
        self._stopping = True
        self._wake.set()
        async with self._step_lock:  # the current step (maybe a claim) is done
            pass
        if self._watch_task:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        tasks = [run.task for run in self.runs.values() if run.task]
        if tasks and grace > 0 and not self._hurry.is_set():
            await self._wait_for_runs(tasks, grace)  # leases stay renewed meanwhile
        for run in list(self.runs.values()):
            if run.task and not run.task.done():
                run.task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    def hurry(self) -> None:
        """End the shutdown grace at once: running tasks are interrupted now (a second signal)."""
        self._hurry.set()

    async def _wait_for_runs(self, tasks: list[asyncio.Task], grace: float) -> None:
        """Wait up to ``grace`` s for ``tasks`` to end (unless hurried), saying what is awaited."""
        deadline = time.monotonic() + grace
        all_done = asyncio.ensure_future(asyncio.wait(tasks))
        hurried = asyncio.ensure_future(self._hurry.wait())
        try:
            while not all_done.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning("Shutdown grace (%g s) is over: interrupting %s", grace, self._names())
                    return
                logger.warning(
                    "Shutting down: waiting up to %.0f s for %s to finish "
                    "(Ctrl+C or SIGTERM again interrupts them now, by their recovery policy)",
                    left,
                    self._names(),
                )
                done, _ = await asyncio.wait(
                    [all_done, hurried],
                    timeout=min(left, LOG_WAIT_EVERY),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if hurried in done:
                    logger.warning("Shutdown hurried: interrupting %s now", self._names())
                    return
        finally:
            all_done.cancel()
            hurried.cancel()

    def _names(self) -> str:
        keys = [str(key) for key, run in self.runs.items() if run.task and not run.task.done()]
        shown = ", ".join(keys[:5])
        return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "") if keys else "nothing"

    async def _main(self) -> None:
        settings = self.settings
        maintenance_every = settings.LEASE_SECONDS / 3
        next_maintenance = 0.0
        while True:
            async with self._step_lock:
                try:
                    now = time.monotonic()
                    if now >= next_maintenance:
                        next_maintenance = now + maintenance_every
                        await self._maintain()
                    if not self._stopping:
                        await self._claim()
                    if self.runs:
                        await self._check_cancellations()
                except Exception:
                    logger.exception("Runner step failed; trying again")
                    await sync_to_async(store.close_broken_connections)()
            try:
                async with asyncio.timeout(settings.POLL_INTERVAL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    # -- the steps of the loop -------------------------------------------------

    async def _claim(self) -> None:
        free = self.settings.MAX_CONCURRENT_TASKS - len(self.runs)
        if free <= 0:
            return
        began = time.monotonic()  # the lease runs from before the claim was sent
        claims = await sync_to_async(store.claim_pending)(
            stream_models(), free, self.owner, self.settings.LEASE_SECONDS, self.settings
        )
        for claim in claims:
            run = TaskRun(self, claim)
            run.hold_until(began + self.lease_span)
            self.runs[run.key] = run
            run.task = asyncio.create_task(self._execute(run), name=f"streaming-task {run.key}")
            self._started(run)
        if claims:
            self.hub.started([(TaskKey.of(claim.instance), claim.first_seq - 1) for claim in claims])

    def _started(self, run: TaskRun) -> None:
        instance = run.instance
        waited = None
        if run.attempt == 1 and instance.started_at and instance.created_at:
            waited = max(0.0, (instance.started_at - instance.created_at).total_seconds())
        if waited is None:
            logger.info("Started %s (attempt %d)", run.key, run.attempt, extra=_fields(run))
        else:
            logger.info(
                "Started %s (attempt %d, %.3f s after it was created)",
                run.key,
                run.attempt,
                waited,
                extra=_fields(run, waited),
            )
        if self.observer is not None:
            self.observer.claimed(run, waited)

    def _ended(self, run: TaskRun, outcome: str, error_type: str | None = None) -> None:
        seconds = time.monotonic() - run.began
        extra = {**_fields(run, seconds), "outcome": str(outcome)}
        if outcome == Status.FAILED:
            logger.warning(
                "Task %s failed: %s (attempt %d, %.3f s)",
                run.key,
                error_type or "Error",
                run.attempt,
                seconds,
                extra=extra,
            )
        else:
            line = "Task %s %s (attempt %d, %.3f s)"
            logger.info(line, run.key, outcome, run.attempt, seconds, extra=extra)
        if self.observer is not None:
            self.observer.ended(run, outcome, seconds)

    def _running_by_model(self) -> store.Running:
        running: store.Running = {}
        for run in self.runs.values():
            running.setdefault(run.model, []).append(run.pk)
        return running

    async def _check_cancellations(self) -> None:
        for model, pk in await sync_to_async(store.cancel_requests)(self._running_by_model(), self.owner):
            run = self.runs.get(TaskKey.of(model, pk))
            if run and run.task and not run.cancel_requested:
                logger.info("Cancelling %s", run.key)
                run.cancel_requested = True
                run.task.cancel()

    async def _maintain(self) -> None:
        lease = self.settings.LEASE_SECONDS
        if self.runs:
            renewing = list(self.runs.values())
            began = time.monotonic()
            lost = {
                TaskKey.of(model, pk)
                for model, pk in await sync_to_async(store.renew_leases)(
                    self._running_by_model(), self.owner, lease
                )
            }
            for run in renewing:
                if run.task is None or run.task.done() or run.ending:
                    continue  # over, or ending: its row is no longer "running", not lost
                if run.key not in lost:
                    run.hold_until(began + self.lease_span)
                elif run.task and not run.lease_lost:
                    run.lose("another node holds the task")
                    run.task.cancel()
        taken = await sync_to_async(store.take_orphans)(
            stream_models(), self.owner, lease, self._running_by_model()
        )
        for model, pk in taken:
            key = TaskKey.of(model, pk)
            try:
                await self._salvage(model, key)
                item = await sync_to_async(store.settle_orphan)(model, pk, self.owner)
            except Exception:
                # Ours for a lease: the next look (or another node's) settles it.
                logger.exception("Recovering %s failed; trying again", key)
                continue
            if item is None:
                continue
            ran = (timezone.now() - item.started_at).total_seconds() if item.started_at else None
            logger.warning(
                "Recovered %s: its server died (attempt %d, claimed %s s before); %s",
                key,
                item.attempt,
                "?" if ran is None else f"{ran:.3f}",
                "running it again" if item.requeued else "failed by its policy",
                extra={"task_key": str(key), "attempt": item.attempt, "duration": ran},
            )
            if item.requeued:
                self.wake()
            else:
                if item.event is not None:  # always, for a task that was failed
                    await self.hub.publish(key, item.event)
                await self._ended_elsewhere(model, pk, Status.FAILED)
            if self.observer is not None:
                self.observer.recovered(model, item.requeued)

    async def _salvage(self, model: type[StreamTask], key: TaskKey) -> None:
        """Log what the dead run published but could not write: with Redis, its
        events reached the stream (and every node's clients) before its log
        write; they are copied into the log before the task is settled, so the
        log holds every event any client saw. (In process there is nothing to
        copy: the run's log writes and its publishes died together.) With
        Redis unreachable this raises, and the task waits for the next look."""
        if not model.persist_events or not self.transport.shared:
            return
        after = await sync_to_async(store.logged_after)(key)
        while True:
            missed = await self.transport.sent_after(key, after, self.settings.EVENT_BATCH_SIZE)
            if not missed:
                return
            await sync_to_async(store.write_events)([(key, event) for event in missed])
            logger.info("Recovering %s: logged %d event(s) its run sent but never wrote", key, len(missed))
            after = missed[-1].seq

    # -- one task -------------------------------------------------------------------

    async def _execute(self, run: TaskRun) -> None:
        instance = run.instance
        instance._stream_run = run
        final_value = None
        error_text = ""
        try:
            try:
                if instance.cancel_requested:
                    run.cancel_requested = True
                    raise asyncio.CancelledError
                if instance.attempts > 1:
                    await run.send(
                        RETRY,
                        {
                            "message": "Running again after an interruption",
                            "attempt": instance.attempts,
                            "max_attempts": instance.max_attempts,
                        },
                    )
                result = await instance.process()
                final_value = to_json_value(result)
            except asyncio.CancelledError as cancelled:
                current = asyncio.current_task()
                requested = current.cancelling() > 0 if current is not None else True
                if current is not None:
                    current.uncancel()
                if run.cancel_requested:
                    status, event_type, data = (
                        Status.CANCELLED,
                        CANCELLED,
                        {"message": "Task cancelled"},
                    )
                elif run.lease_lost:
                    self._ended(run, LOST)
                    return  # another runner owns the task now
                elif self._stopping and requested:
                    await self._interrupted(run)
                    return
                elif requested:
                    raise
                else:  # process() itself let a CancelledError out: a failure like any other
                    status, event_type, data, error_text = _failure(run, cancelled)
            except Exception as exc:
                status, event_type, data, error_text = _failure(run, exc)
            else:
                status, event_type = Status.COMPLETED, COMPLETE
                data = (
                    final_value
                    if isinstance(final_value, dict)
                    else ({} if final_value is None else {"result": final_value})
                )
            # Watchers are about to hear the end: a cancel arriving now must
            # not leave the row running with a terminal event already out.
            finishing = asyncio.ensure_future(
                self._end_durably(run, status, event_type, data, final_value, error_text)
            )
            try:
                won = await asyncio.shield(finishing)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None:  # always: _execute() runs as a task
                    current.uncancel()
                won = await finishing
            self._ended(run, status if won else LOST, data.get("type"))
            if won:
                await self._call_on_end(run, status)
        except Exception:
            logger.exception("Ending task %s failed; its lease will expire", run.key)
        finally:
            run.release()
            self.runs.pop(run.key, None)
            self.hub.run_stopped(run.key)

    async def _call_on_end(self, run: TaskRun, status: str) -> None:
        try:
            await run.instance.on_end(status)
        except Exception:
            logger.exception("%s.on_end() failed", run.model.__name__)

    async def _ended_elsewhere(self, model: type[StreamTask], pk: object, status: str) -> None:
        """on_end() of a task this runner failed by recovery (its run was another's):
        read the row for it only when the class has an on_end() of its own."""
        if model.on_end is StreamTask.on_end:
            return
        try:
            instance = await model.objects.aget(pk=pk)
            await instance.on_end(status)
        except Exception:
            logger.exception("%s.on_end() failed", model.__name__)

    async def _end_durably(
        self,
        run: TaskRun,
        status: str,
        event_type: str,
        data: dict[str, Any],
        final_value: Any,
        error_text: str,
    ) -> bool:
        """run.end(), again and again while the database fails; False: the lease was lost.

        The run stays in self.runs meanwhile, so its lease is renewed and no
        other runner takes the task up; only a stopping server gives up
        (its lease then expires and the task is recovered by policy).
        """
        delay = 0.5
        while True:
            try:
                return await run.end(status, event_type, data, final_value=final_value, error=error_text)
            except Exception:
                if self._stopping:
                    raise
                logger.exception("Ending task %s failed; retrying in %.1f s", run.key, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _interrupted(self, run: TaskRun) -> None:
        """The server is stopping under this task: retry it later or fail it."""
        await self.eventlog.flush()
        if run.instance.recovery == Recovery.RETRY and run.instance.attempts < run.instance.max_attempts:
            await sync_to_async(store.finish)(run.model, run.pk, self.owner, Status.PENDING, None)
            logger.info("Handed %s back; another runner (or the next start) takes it up", run.key)
            self._ended(run, HANDED_BACK)
            await self.transport.wake()
            return
        message = "Task interrupted: the server shut down"
        won = await run.end(Status.FAILED, ERROR, {"message": message, "type": "Interrupted"}, error=message)
        self._ended(run, Status.FAILED if won else LOST, "Interrupted")
        if won:
            await self._call_on_end(run, Status.FAILED)


def _fields(run: TaskRun, seconds: float | None = None) -> dict[str, Any]:
    """A run's log line's fields for structured log handlers (``record.task_key`` ...)."""
    return {"task_key": str(run.key), "attempt": run.attempt, "duration": seconds}


def _failure(run: TaskRun, exc: BaseException) -> tuple[Status, str, dict[str, str], str]:
    logger.error("Task %s failed", run.key, exc_info=exc)
    data = {"message": str(exc) or type(exc).__name__, "type": type(exc).__name__}
    return Status.FAILED, ERROR, data, "".join(traceback.format_exception(exc))
