"""The library's models: StreamTask (abstract, every task subclasses it) and TaskEvent (the log).

Any installed task model can also be imported from here by its name, for a
quick ``manage.py shell`` one-liner: ``from streaming.models import Report``
finds ``myapp.models.Report`` (see ``__getattr__`` below).
"""

import asyncio
import inspect
from collections.abc import AsyncIterable, Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Self

from asgiref.sync import sync_to_async
from django.db import models, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from .conf import get_settings
from .events import RESERVED_TYPES, validate_event_type
from .tasks import wake

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser

    from .conf import StreamingSettings
    from .tasks.run import TaskRun

__all__ = ["FINISHED_STATUSES", "EnqueuedTask", "Recovery", "Status", "StreamTask", "TaskEvent"]


class Status(models.TextChoices):
    CREATED = "created", "created (not started)"
    PENDING = "pending", "pending"
    RUNNING = "running", "running"
    COMPLETED = "completed", "completed"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


FINISHED_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


class Recovery(models.TextChoices):
    """What happens to a task whose server died while it ran."""

    RETRY = "retry", "run process() again from the start"
    FAIL = "fail", "end the task with an error event"


class StreamTask(models.Model):
    """A task is a row: create one and a streaming server runs its process().

    Subclasses implement ``async def process(self)``, call
    ``await self.send_event(type, data)`` as they go, and return the final
    value (stored in ``final_value`` and sent with the ``complete`` event).
    """

    # Class-level options; override them on a subclass.
    persist_events = True  # False: only the terminal event reaches the event log
    recovery = Recovery.FAIL  # process() may have side effects: never repeat it silently
    max_attempts = 3  # with Recovery.RETRY: runs at most this often in all
    # Who may watch (README "Security"). False, the default: only a request with
    # a stream token for the task (stream_token(), stream_url()), or of a
    # Django user for whom has_stream_permission() says yes. True: anyone who
    # can reach the server reads this class's streams and JSON status.
    public_stream = False

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    final_value = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    lease_owner = models.CharField(max_length=200, null=True, blank=True, db_index=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Event sequence numbers below this are handed out already: a task taken
    # up again after a crash numbers its events above anything a client saw.
    seq_reserved = models.BigIntegerField(default=0)

    _stream_run: "TaskRun | None" = None  # set by the runner while process() runs

    if TYPE_CHECKING:
        # Django gives every concrete task model its ``objects``; django-stubs
        # adds none to an abstract model, whose methods use it all the same.
        objects: ClassVar[models.Manager[Self]]

    class Meta:
        abstract = True

    async def process(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement async def process(self)")

    async def on_end(self, status: str) -> None:
        """Called by a runner once it wrote the task's end (``status``: completed,
        failed or cancelled), in the server's event loop: after a run, and after
        failing a task by recovery (its server died; then on a fresh instance, on
        the node that recovered it). Default: nothing."""

    @classmethod
    def claimable(cls, pending: QuerySet[Self], settings: "StreamingSettings") -> QuerySet[Self]:
        """The pending rows a runner with ``settings`` may claim, in claim order
        (the claim takes the first ones). Default: all of them, oldest first."""
        return pending.order_by("pk")

    @classmethod
    def runs_here(cls) -> bool:
        """Whether runners claim, recover and stream this model in this project
        (asked once, cached until a settings change). Default: yes."""
        return True

    # -- inside process() ---------------------------------------------------

    async def send_event(self, event_type: str, data: dict[str, Any] | None = None) -> int:
        """Send one event to every watcher; returns its sequence number."""
        validate_event_type(event_type)
        if event_type in RESERVED_TYPES:
            raise ValueError(
                f"'{event_type}' is sent by the runner: return from process() to complete, raise to fail"
            )
        return (await self._current_run().send(event_type, data)).seq

    async def send_events_from(
        self, source: AsyncIterable[dict[str, Any]] | Iterable[dict[str, Any]], event_type: str = "progress"
    ) -> int:
        """Send each item of an async or sync iterable (dicts) as one event.

        A sync generator runs in a worker thread, one item at a time, so a
        blocking producer never stalls the server. Returns the count sent.
        """
        count = 0
        if isinstance(source, AsyncIterable):
            async for item in source:
                await self.send_event(event_type, item)
                count += 1
            return count
        iterator = iter(source)
        done: dict[str, Any] = {}  # a sentinel: no item is this very dict
        next_item = sync_to_async(lambda: next(iterator, done))  # the ORM thread: a generator may query
        while (item := await next_item()) is not done:
            await self.send_event(event_type, item)
            count += 1
        return count

    async def wait_until(
        self,
        predicate: Callable[[Self], Any],
        *,
        fields: list[str] | None = None,
        poll_interval: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Wait until ``predicate(self)`` is true, re-reading the row meanwhile.

        Re-reads ``fields`` (all fields if None) every ``poll_interval``
        seconds (STREAMING["WAIT_POLL_INTERVAL"] by default), and at once when
        this process saves the row. Raises TimeoutError after ``timeout``
        seconds (None: wait as long as it takes).
        """
        interval = poll_interval or get_settings().WAIT_POLL_INTERVAL
        run = self._stream_run
        async with asyncio.timeout(timeout):
            while True:
                await self.arefresh_from_db(fields=fields)
                result = predicate(self)
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                if run is not None:
                    await run.wait_for_row_change(interval)
                else:
                    await asyncio.sleep(interval)

    @property
    def attempt(self) -> int:
        """This run's number (1 for the first, 2 after one interruption, ...): a
        fencing token for writes to other systems. A write that carries it can
        be refused there once a later attempt has written (an upsert guarded
        by ``attempt >= stored attempt``, say)."""
        return self._current_run().attempt

    async def check_lease(self) -> float:
        """Prove, with the database, that this run still holds the task; call it
        just before a side effect that must not happen twice. Returns the
        seconds the lease is proven for from now; raises
        ``streaming.LeaseLost`` (a ``CancelledError``: let it propagate) if
        another node holds the task or the lease could not be proven in time."""
        return await self._current_run().check_lease()

    def _current_run(self) -> "TaskRun":
        run = self._stream_run
        if run is None:
            raise RuntimeError(
                f"{type(self).__name__}.send_event() works only while a streaming server runs the "
                "task (manage.py runserver_stream), or under streaming.testing.run_task() in tests"
            )
        return run

    # -- control, from anywhere --------------------------------------------

    def start(self) -> bool:
        """Queue a task created with status 'created'; False if it was not 'created'."""
        started = type(self).objects.filter(pk=self.pk, status=Status.CREATED).update(status=Status.PENDING)
        if started:
            self.status = Status.PENDING
            transaction.on_commit(wake.wake_runners)
        return bool(started)

    async def astart(self) -> bool:
        return await sync_to_async(self.start)()

    def cancel(self) -> str:
        """Cancel: a pending task ends at once, a running one is stopped by its runner.

        Returns the task's status after asking. A task not yet taken by a
        runner is queued so that a runner ends it as cancelled without
        running it: the runner alone finishes tasks, so every terminal event
        goes out to live watchers.
        """
        model = type(self)
        with transaction.atomic():
            model.objects.filter(pk=self.pk, status=Status.CREATED).update(status=Status.PENDING)
            model.objects.filter(pk=self.pk, status__in=[Status.PENDING, Status.RUNNING]).update(
                cancel_requested=True
            )
            status = model.objects.filter(pk=self.pk).values_list("status", flat=True).first()
        if status is None:
            raise model.DoesNotExist(f"{model.__name__} {self.pk} does not exist")
        self.status = status
        if status not in FINISHED_STATUSES:
            self.cancel_requested = True
            transaction.on_commit(wake.wake_runners)
        return status

    async def acancel(self) -> str:
        return await sync_to_async(self.cancel)()

    def rerun(self, **changes: Any) -> Self:
        """Run a finished task again, as a new row; returns the new task (pending).

        The new row copies this row's own fields (those of your subclass, read
        afresh from the database), not the bookkeeping of ``StreamTask``
        (status, times, result, attempts, lease...); ``changes`` set fields of
        the new row instead (``task.rerun(size=10)``), in the same INSERT, so
        no runner can claim it before they are set. A new row and not a reset
        of this one: a stream ends at its terminal event, and whoever watches
        this id keeps seeing this run's finished history. Many-to-many
        relations are not copied; override to copy them, or to reset fields
        that describe a run (``return super().rerun(my_log=[], **changes)``).
        Raises ValueError for a task that is not finished.
        """
        model = type(self)
        current = model.objects.get(pk=self.pk)
        if not current.is_finished:
            raise ValueError(
                f"{model.__name__} {self.pk} is {current.status}: only a finished task "
                "(completed, failed or cancelled) can run again"
            )
        bookkeeping = {f.name for f in StreamTask._meta.local_fields}
        values = {
            field.attname: getattr(current, field.attname)
            for field in model._meta.concrete_fields
            if not field.primary_key
            and field.name not in bookkeeping
            and not (field.remote_field is not None and field.remote_field.parent_link)
        }
        return model.objects.create(**{**values, **changes, "status": Status.PENDING})

    async def arerun(self, **changes: Any) -> Self:
        return await sync_to_async(self.rerun)(**changes)

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @classmethod
    def stream_name(cls) -> str:
        return cls.__name__

    def get_stream_path(self) -> str:
        """``/stream/<Model>/<id>``; ``/stream/<app_label>/<Model>/<id>`` when another
        app has a task model of this class name, where the short path is ambiguous (404)."""
        name = self.stream_name()
        if _name_is_shared(type(self)):
            name = f"{self._meta.app_label}/{name}"
        return f"/stream/{name}/{self.pk}"

    # -- who may watch (streaming/access.py) ----------------------------------

    def has_stream_permission(self, user: "AbstractBaseUser") -> bool:
        """May ``user`` (an authenticated, active Django user) watch this task?

        Asked once per stream request whose session cookie names a user (not
        for public classes, token requests or anonymous ones), in a worker
        thread: the ORM is fine here. The default: the model's ``view``
        permission (``<app_label>.view_<model_name>``), so superusers and
        users or groups granted it. Override for rules of your own, e.g.
        ``return user.pk == self.owner_id or user.is_staff``.
        """
        opts = self._meta
        has_perm: Callable[[str], bool] = getattr(user, "has_perm", lambda _perm: False)
        return has_perm(f"{opts.app_label}.view_{opts.model_name}")

    async def ahas_stream_permission(self, user: "AbstractBaseUser") -> bool:
        """The async form the server calls: by default ``has_stream_permission()`` in a thread."""
        return await sync_to_async(self.has_stream_permission)(user)

    @classmethod
    def has_feed_permission(cls, user: "AbstractBaseUser") -> bool:
        """May ``user`` follow every task of this model (``feed=`` on the multiplexed stream)?

        Asked in a worker thread. The default: the model's ``view`` permission,
        as for one task, unless the class overrides ``has_stream_permission``
        or ``ahas_stream_permission`` (rules per row, e.g. owners): then only
        superusers, since a feed shows every row. Override this too for rules
        of your own.
        """
        if (
            cls.has_stream_permission is not StreamTask.has_stream_permission
            or cls.ahas_stream_permission is not StreamTask.ahas_stream_permission
        ):
            return bool(getattr(user, "is_superuser", False))
        opts = cls._meta
        has_perm: Callable[[str], bool] = getattr(user, "has_perm", lambda _perm: False)
        return has_perm(f"{opts.app_label}.view_{opts.model_name}")

    def stream_token(self, *, expires_in: float = 300) -> str:
        """A signed token that opens this task's stream for ``expires_in`` seconds.

        Send it as ``Authorization: Bearer <token>`` or ``?token=<token>``.
        ``streaming.access.stream_token([task, ...])`` mints one for several tasks.
        """
        from .access import stream_token

        return stream_token(self, expires_in=expires_in)

    def stream_url(self, *, expires_in: float = 300) -> str:
        """This task's stream path with a token: ``/stream/<Model>/<id>?token=...``,
        for a browser's ``new EventSource(url)`` (which cannot send headers)."""
        return f"{self.get_stream_path()}?token={self.stream_token(expires_in=expires_in)}"

    def __str__(self) -> str:
        return f"{type(self).__name__} {self.pk} ({self.status})"


class EnqueuedTask(StreamTask):
    """A ``@task`` function enqueued through Django's tasks framework
    (``streaming.taskbackend.StreamingTaskBackend``): one row per ``enqueue()``.

    ``process()`` imports the function by its path and calls it with the
    stored arguments (a sync function in a thread of its own). The row's
    ``recovery`` and ``max_attempts`` are per task (the backend's OPTIONS, or
    the ``@task(recovery=..., max_attempts=...)`` of this backend's task class).
    """

    task_path = models.CharField(max_length=300)  # the module path of the @task object
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    backend = models.CharField(max_length=100, default="default")  # the TASKS alias
    queue_name = models.CharField(max_length=100, default="default", db_index=True)
    priority = models.SmallIntegerField(default=0)  # -100..100, higher runs first
    run_after = models.DateTimeField(null=True, blank=True)  # not claimed before this
    takes_context = models.BooleanField(default=False)
    # Per row, read by crash recovery in place of the class-level options of StreamTask.
    recovery = models.CharField(  # type: ignore[assignment]  # a field where StreamTask has a class option
        max_length=8, choices=Recovery.choices, default=Recovery.FAIL
    )
    max_attempts = models.PositiveSmallIntegerField(default=3)
    first_started_at = models.DateTimeField(null=True, blank=True)
    worker_ids = models.JSONField(default=list, blank=True)  # the lease owner of each attempt
    # [{"attempt": n, "exception_class_path": "...", "traceback": "..."}]: what the function raised
    errors = models.JSONField(default=list, blank=True)

    class Meta:
        verbose_name = "enqueued task"
        indexes = [models.Index(fields=["status", "-priority", "id"], name="streaming_enqueued_claim")]

    def rerun(self, **changes: Any) -> Self:
        """The same call, enqueued again: a new result with a history of its own."""
        return super().rerun(first_started_at=None, worker_ids=[], errors=[], **changes)

    async def process(self) -> Any:
        from .taskbackend import worker

        return await worker.execute(self)

    async def on_end(self, status: str) -> None:
        from .taskbackend import worker

        await worker.ended(self)

    @classmethod
    def claimable(cls, pending: QuerySet[Self], settings: "StreamingSettings") -> QuerySet[Self]:
        """Due rows (``run_after`` passed) of the queues this runner serves
        (``STREAMING["TASK_QUEUES"]``, all when empty), highest priority first, then oldest;
        a cancelled one at once, due or not, of any queue (the runner ends it without running it)."""
        runnable = Q(run_after__isnull=True) | Q(run_after__lte=timezone.now())
        if settings.TASK_QUEUES:
            runnable &= Q(queue_name__in=settings.TASK_QUEUES)
        return pending.filter(runnable | Q(cancel_requested=True)).order_by("-priority", "pk")

    @classmethod
    def runs_here(cls) -> bool:
        """Only in a project whose TASKS names our backend (or a subclass): others
        pay no query for this table."""
        from django.conf import settings
        from django.utils.module_loading import import_string

        for params in (getattr(settings, "TASKS", None) or {}).values():
            try:
                backend = import_string(str(params.get("BACKEND", "")))
            except ImportError:
                continue  # the tasks framework reports a bad BACKEND itself
            if getattr(backend, "runs_enqueued_tasks", False):
                return True
        return False


class TaskEvent(models.Model):
    """One event of one task: the durable record behind every stream."""

    task_type = models.CharField(max_length=100)  # the model's label_lower
    task_id = models.CharField(max_length=64)
    seq = models.BigIntegerField()
    type = models.CharField(max_length=64)
    payload = models.TextField()  # the JSON sent as data:, byte for byte
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task_type", "task_id", "seq"], name="streaming_event_unique_seq")
        ]
        ordering = ["task_type", "task_id", "seq"]

    def __str__(self) -> str:
        return f"{self.task_type}:{self.task_id} #{self.seq} {self.type}"


def _name_is_shared(model: type[StreamTask]) -> bool:
    """Does another installed task model have ``model``'s class name (system check ``streaming.I001``)?"""
    from django.apps import apps

    concrete = model._meta.concrete_model or model
    return any(
        other is not concrete
        and other.__name__ == model.__name__
        and issubclass(other, StreamTask)
        and not other._meta.proxy
        for other in apps.get_models()
    )


def __getattr__(name: str) -> Any:
    """``from streaming.models import Report``: any installed task model, by its name.

    A convenience for shells and scripts (the demo's ContinueTask one-liner
    uses it); in code, import the model from its own app.
    """
    from django.apps import apps

    if name.startswith("_") or not apps.models_ready:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for model in apps.get_models():
        if issubclass(model, StreamTask) and model.__name__ == name:
            return model
    raise AttributeError(
        f"module {__name__!r} has no attribute {name!r} (no installed task model of that name)"
    )
