"""The runner: the one place that starts, cancels, finishes and recovers tasks."""

import asyncio
import logging
import sqlite3
import time
import traceback

from asgiref.sync import sync_to_async
from django.db import connection

from . import store
from .base import Recovery, Status
from .broker import is_shared
from .events import CANCELLED, COMPLETE, ERROR, RETRY, Event, build_payload, to_json_value
from .registry import stream_models, task_key

logger = logging.getLogger(__name__)

SQLITE_WATCH_INTERVAL = 0.02


class TaskRun:
    """One run of one task: its event numbering, its coroutine, its wake-ups."""

    def __init__(self, runner: "Runner", claim: store.Claim):
        self.runner = runner
        self.instance = claim.instance
        self.model = type(claim.instance)
        self.pk = claim.instance.pk
        self.key = task_key(self.model, self.pk)
        self.task_type, _, self.task_id = self.key.partition(":")
        self.next_seq = claim.first_seq
        self.reserved_to = claim.reserved_to
        self.cancel_requested = False
        self.lease_lost = False
        self.task: asyncio.Task | None = None
        self._reserve_lock = asyncio.Lock()
        self._row_changed = asyncio.Event()
        self._terminal: Event | None = None

    async def send(self, event_type: str, data) -> Event:
        event = await self.number(event_type, data)
        await self.runner.broker.publish(self.key, event)
        if self.model.persist_events:
            self.runner.eventlog.append(self.task_type, self.task_id, event)
        return event

    async def number(self, event_type: str, data) -> Event:
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

    async def end(self, status: str, event_type: str, data, **fields) -> bool:
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
            await self.runner.broker.publish(self.key, self._terminal)
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


class Runner:
    def __init__(self, *, broker, eventlog, settings, owner: str | None = None):
        self.broker = broker
        self.eventlog = eventlog
        self.settings = settings
        self.owner = owner or store.new_owner_id()
        self.runs: dict[str, TaskRun] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._step_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        broker.on_wake(self.wake_threadsafe)

    # -- wake-ups -----------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def wake_threadsafe(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def row_changed_threadsafe(self, key: str) -> None:
        run = self.runs.get(key)
        if run is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(run.row_changed)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_task = asyncio.create_task(self._main(), name="streaming-runner")
        if connection.vendor == "sqlite":
            self._watch_task = asyncio.create_task(
                self._watch_sqlite(connection.settings_dict["NAME"]), name="streaming-sqlite-watch"
            )
        elif connection.vendor == "postgresql" and not is_shared(self.settings.BROKER_URL):
            # (With Redis, wake-ups travel through it.)
            self._watch_task = asyncio.create_task(self._listen_postgres(), name="streaming-pg-listen")

    async def _listen_postgres(self) -> None:
        """Wake at once when another process saves a pending row (create_task, shell, admin):
        signals.py sends NOTIFY on commit; this connection LISTENs."""
        import psycopg

        conninfo = store.pg_conninfo()
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listener:
                    await listener.execute(f"LISTEN {store.PG_WAKE_CHANNEL}")
                    self._wake.set()  # whatever was saved while nobody listened
                    async for _notice in listener.notifies():
                        self._wake.set()
            except (psycopg.Error, OSError) as exc:
                logger.warning("PostgreSQL wake-up listener lost (%s); polling meanwhile, retrying", exc)
                await asyncio.sleep(1)

    async def _watch_sqlite(self, path) -> None:
        """Wake at once when another connection commits (create_task, shell, admin).

        ``PRAGMA data_version`` changes whenever another connection commits;
        reading it costs microseconds, so a 20 ms check replaces a query per
        model per poll as the way rows written by other processes are noticed.
        """
        watcher = sqlite3.connect(path, timeout=0, check_same_thread=False)
        try:
            version = None
            while True:
                try:
                    current = watcher.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.OperationalError:
                    current = version  # busy for a moment: look again next time
                if version is not None and current != version:
                    self._wake.set()
                version = current
                await asyncio.sleep(SQLITE_WATCH_INTERVAL)
        finally:
            watcher.close()

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
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)  # leases stay renewed meanwhile
        for run in list(self.runs.values()):
            if run.task and not run.task.done():
                run.task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

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
        claims = await sync_to_async(store.claim_pending)(
            stream_models(), free, self.owner, self.settings.LEASE_SECONDS
        )
        for claim in claims:
            run = TaskRun(self, claim)
            self.runs[run.key] = run
            run.task = asyncio.create_task(self._execute(run), name=f"streaming-task {run.key}")

    def _running_by_model(self) -> dict:
        running: dict = {}
        for run in self.runs.values():
            running.setdefault(run.model, []).append(run.pk)
        return running

    async def _check_cancellations(self) -> None:
        for model, pk in await sync_to_async(store.cancel_requests)(self._running_by_model(), self.owner):
            run = self.runs.get(task_key(model, pk))
            if run and run.task and not run.cancel_requested:
                logger.info("Cancelling %s", run.key)
                run.cancel_requested = True
                run.task.cancel()

    async def _maintain(self) -> None:
        lease = self.settings.LEASE_SECONDS
        if self.runs:
            for model, pk in await sync_to_async(store.renew_leases)(
                self._running_by_model(), self.owner, lease
            ):
                run = self.runs.get(task_key(model, pk))
                if run and run.task:
                    logger.warning("Lost the lease of %s; stopping it here", run.key)
                    run.lease_lost = True
                    run.task.cancel()
        recovered = await sync_to_async(store.recover_orphans)(stream_models(), self.owner, lease)
        for item in recovered:
            key = task_key(item.model, item.pk)
            if item.requeued:
                logger.warning("Recovered %s: its server died; running it again", key)
                self.wake()
            else:
                logger.warning("Recovered %s: its server died; failed by its policy", key)
                await self.broker.publish(key, item.event)

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
                            "max_attempts": run.model.max_attempts,
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
                await asyncio.shield(finishing)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()
                await finishing
        except Exception:
            logger.exception("Ending task %s failed; its lease will expire", run.key)
        finally:
            self.runs.pop(run.key, None)
            self.broker.run_stopped(run.key)

    async def _end_durably(self, run, status, event_type, data, final_value, error_text) -> None:
        """run.end(), again and again while the database fails.

        The run stays in self.runs meanwhile, so its lease is renewed and no
        other runner takes the task up; only a stopping server gives up
        (its lease then expires and the task is recovered by policy).
        """
        delay = 0.5
        while True:
            try:
                await run.end(status, event_type, data, final_value=final_value, error=error_text)
                return
            except Exception:
                if self._stopping:
                    raise
                logger.exception("Ending task %s failed; retrying in %.1f s", run.key, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _interrupted(self, run: TaskRun) -> None:
        """The server is stopping under this task: retry it later or fail it."""
        await self.eventlog.flush()
        if run.model.recovery == Recovery.RETRY and run.instance.attempts < run.model.max_attempts:
            await sync_to_async(store.finish)(run.model, run.pk, self.owner, Status.PENDING, None)
            logger.info("Handed %s back; another runner (or the next start) takes it up", run.key)
            await self.broker.wake()
            return
        message = "Task interrupted: the server shut down"
        await run.end(Status.FAILED, ERROR, {"message": message, "type": "Interrupted"}, error=message)


def _failure(run, exc: BaseException):
    logger.error("Task %s failed", run.key, exc_info=exc)
    data = {"message": str(exc) or type(exc).__name__, "type": type(exc).__name__}
    return Status.FAILED, ERROR, data, "".join(traceback.format_exception(exc))
