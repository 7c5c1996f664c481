"""Every database operation of the runner and the event log, in one place.

Functions here are synchronous (Django's ORM); async callers wrap them with
``sync_to_async`` so a whole step (a claim, a finish) is one trip to the
ORM thread. Every state change of a task row is conditional on the state the
caller expects (status, lease owner), so two processes never both win.
"""

import logging
import os
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import OperationalError, connection, connections, transaction
from django.db.models import F, Max
from django.utils import timezone

from ..conf import get_settings
from ..events import ERROR, Event, build_payload
from ..fanout.hub import RunningTask
from ..keys import TaskKey
from ..models import FINISHED_STATUSES, Recovery, Status, StreamTask, TaskEvent

if TYPE_CHECKING:
    from ..conf import StreamingSettings

logger = logging.getLogger(__name__)

SEQ_BLOCK = 1000  # sequence numbers reserved on the row at a time
# PostgreSQL ends a session that sits this long inside one of our transactions
# (a node paused or cut off mid-transaction), so the row locks it holds do not
# stop other nodes for as long as the stall lasts. Our transactions take
# milliseconds; only a stalled node comes near this.
IDLE_IN_TRANSACTION = "1s"
# How long a takeover waits for a row lock before it leaves the row for its next look.
TAKEOVER_LOCK_WAIT = "200ms"
HOSTNAME = socket.gethostname()


@contextmanager
def bounded_transaction(**bounds: str) -> Iterator[None]:
    """``transaction.atomic()``; on PostgreSQL with IDLE_IN_TRANSACTION and any other
    ``SET LOCAL`` bounds (``lock_timeout="200ms"``) for its duration."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            settings = {"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION, **bounds}
            with connection.cursor() as cursor:
                for name, value in settings.items():  # our own constants: no user input
                    cursor.execute(f"SET LOCAL {name} = '{value}'")
        yield


def close_broken_connections() -> None:
    """After a failed database step: close this thread's connections that broke
    (a reset, a server that ended the session), so the next step reconnects.
    Django does this around requests; the runner's loops have none."""
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()


def new_owner_id() -> str:
    return f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str | None, me: str) -> bool:
    """True when ``owner`` is a runner on this host whose process is gone.

    Lets a server restarted after kill -9 take its tasks back at once instead
    of waiting for their leases to run out. Owners on other hosts are judged
    by their lease alone.
    """
    if not owner or owner == me:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOSTNAME or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another runner of this very process (tests run several): alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def next_free_seq(model: type[StreamTask], pk: object, seq_reserved: int) -> int:
    return max(seq_reserved, logged_after(TaskKey.of(model, pk))) + 1


def running_tasks(model: type[StreamTask], limit: int) -> list[RunningTask]:
    """Up to ``limit`` running tasks of ``model``, the most recently started first (for feeds)."""
    rows = (
        model.objects.filter(status=Status.RUNNING)
        .order_by("-started_at")
        .values_list("pk", "started_at", "attempts")[:limit]
    )
    return [
        RunningTask(TaskKey.of(model, pk), None if started is None else started.timestamp(), attempts)
        for pk, started, attempts in rows
    ]


# -- claims and leases ------------------------------------------------------


@dataclass
class Claim:
    instance: StreamTask
    first_seq: int
    reserved_to: int


def claim_pending(
    models: Iterable[type[StreamTask]],
    limit: int,
    owner: str,
    lease_seconds: float,
    settings: "StreamingSettings | None" = None,
) -> list[Claim]:
    """Take up to ``limit`` pending tasks for ``owner``; each goes to one runner only.

    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` hands concurrent
    runners disjoint rows, one transaction per model. SQLite (one writer at a
    time): a conditional ``UPDATE ... WHERE status='pending'`` per row, which
    only one runner wins, each in its own transaction.

    A database error stops the claim: it is raised when nothing was claimed
    yet; otherwise logged, and the claims committed so far are returned, so
    they run (raised, they would sit "running" with no run until their lease
    ran out and recovery failed them). A claim whose transaction did not
    commit is never returned: its rows stay pending for the next step.
    """
    skip_locked = connection.features.has_select_for_update_skip_locked
    settings = settings or get_settings()
    claims: list[Claim] = []
    for model in models:
        wanted = limit - len(claims)
        if wanted <= 0:
            break
        try:
            if skip_locked:
                _claim_locked(model, wanted, owner, lease_seconds, settings, claims)
            else:
                _claim_each(model, wanted, owner, lease_seconds, settings, claims)
        except Exception:
            if not claims:
                raise
            logger.exception("Claiming %s failed; running the %d claimed", model.__name__, len(claims))
            return claims
    return claims


def _claim_locked(
    model: type[StreamTask],
    wanted: int,
    owner: str,
    lease_seconds: float,
    settings: "StreamingSettings",
    claims: list[Claim],
) -> None:
    """PostgreSQL: ``model``'s rows in one transaction; added to ``claims`` once it committed."""
    with bounded_transaction():
        pending = model.claimable(model.objects.filter(status=Status.PENDING), settings)
        pks = list(pending.select_for_update(skip_locked=True).values_list("pk", flat=True)[:wanted])
        taken = [c for pk in pks if (c := _take(model, pk, owner, lease_seconds))]
    claims.extend(taken)


def _claim_each(
    model: type[StreamTask],
    wanted: int,
    owner: str,
    lease_seconds: float,
    settings: "StreamingSettings",
    claims: list[Claim],
) -> None:
    """SQLite: ``model``'s rows one transaction each; each added to ``claims`` once it committed."""
    pending = model.claimable(model.objects.filter(status=Status.PENDING), settings)
    for pk in list(pending.values_list("pk", flat=True)[:wanted]):
        with bounded_transaction():
            claim = _take(model, pk, owner, lease_seconds)
        if claim:
            claims.append(claim)


def _take(model: type[StreamTask], pk: object, owner: str, lease_seconds: float) -> Claim | None:
    now = timezone.now()
    won = model.objects.filter(pk=pk, status=Status.PENDING).update(
        status=Status.RUNNING,
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        attempts=F("attempts") + 1,
        started_at=now,
    )
    if not won:
        return None  # another runner was faster
    instance = model.objects.get(pk=pk)
    first = next_free_seq(model, pk, instance.seq_reserved)
    instance.seq_reserved = first + SEQ_BLOCK - 1
    model.objects.filter(pk=pk).update(seq_reserved=instance.seq_reserved)
    return Claim(instance, first, instance.seq_reserved)


def reserve_seq(model: type[StreamTask], pk: object, owner: str, upto: int) -> bool:
    return bool(
        model.objects.filter(pk=pk, lease_owner=owner, seq_reserved__lt=upto).update(seq_reserved=upto)
    )


class Fence(NamedTuple):
    """Who may write for a task: the run of ``attempt`` by ``owner``. A write
    fenced with it lands only while the row still says so (status running,
    that owner, that attempt), checked in the write's own transaction."""

    model: type[StreamTask]
    pk: object
    owner: str
    attempt: int


def renew_lease(fence: Fence, lease_seconds: float) -> bool:
    """Renew one run's lease now; False if the row no longer belongs to that run."""
    return bool(
        _fenced(fence.model, fence.owner)
        .filter(pk=fence.pk, attempts=fence.attempt)
        .update(lease_expires_at=timezone.now() + timedelta(seconds=lease_seconds))
    )


def _fenced(model: type[StreamTask], owner: str) -> Any:
    return model.objects.filter(lease_owner=owner, status=Status.RUNNING)


# {model: [pk, ...]}: a runner's running tasks, and (model, pk): one of them
Running = dict[type[StreamTask], list[object]]
TaskRef = tuple[type[StreamTask], object]


def renew_leases(running: Running, owner: str, lease_seconds: float) -> list[TaskRef]:
    """Extend the leases of ``running`` ({model: [pk, ...]}); return (model, pk) lost."""
    expires = timezone.now() + timedelta(seconds=lease_seconds)
    lost: list[TaskRef] = []
    for model, pks in running.items():
        model.objects.filter(pk__in=pks, lease_owner=owner, status=Status.RUNNING).update(
            lease_expires_at=expires
        )
        held = set(
            model.objects.filter(pk__in=pks, lease_owner=owner, status=Status.RUNNING).values_list(
                "pk", flat=True
            )
        )
        lost.extend((model, pk) for pk in pks if pk not in held)
    return lost


def cancel_requests(running: Running, owner: str) -> list[TaskRef]:
    found: list[TaskRef] = []
    for model, pks in running.items():
        found.extend(
            (model, pk)
            for pk in model.objects.filter(
                pk__in=pks, lease_owner=owner, status=Status.RUNNING, cancel_requested=True
            ).values_list("pk", flat=True)
        )
    return found


def finish(
    model: type[StreamTask],
    pk: object,
    owner: str,
    status: str,
    terminal: Event | None,
    *,
    attempt: int | None = None,
    **fields: Any,
) -> bool:
    """End a run: the row's final state and its terminal event, atomically;
    only while ``owner`` (and that ``attempt``, when given) holds the row."""
    held = model.objects.filter(pk=pk, lease_owner=owner)
    if attempt is not None:
        held = held.filter(attempts=attempt)
    with bounded_transaction():
        won = held.update(
            status=status,
            completed_at=timezone.now() if status in FINISHED_STATUSES else None,
            lease_owner=None,
            lease_expires_at=None,
            **fields,
        )
        if won and terminal is not None:
            write_events([(TaskKey.of(model, pk), terminal)])
    return bool(won)


@dataclass
class Recovered:
    model: type[StreamTask]
    pk: object
    requeued: bool
    event: Event | None  # the error event written when the task was failed
    attempt: int = 0  # the dead run's
    started_at: datetime | None = None  # when the dead run was claimed


def take_orphans(
    models: Iterable[type[StreamTask]], owner: str, lease_seconds: float, running_here: Running
) -> list[TaskRef]:
    """Take over running tasks whose runner is gone (lease expired, or its
    process dead on this host; this node's own rows too, once their run here
    stopped itself): ``owner`` holds each for a lease while it settles it
    (``settle_orphan``), so no other node takes it meanwhile. A row whose lock
    another node holds (it stalled mid-transaction) is left for the next look."""
    taken: list[TaskRef] = []
    for model in models:
        mine = {str(pk) for pk in running_here.get(model, ())}
        running = model.objects.filter(status=Status.RUNNING)
        for pk, old_owner, expires in running.values_list("pk", "lease_owner", "lease_expires_at"):
            if old_owner == owner and str(pk) in mine:
                continue  # its run here renews it
            expired = expires is None or expires < timezone.now()
            if not (expired or owner_is_dead(old_owner, owner)):
                continue
            try:
                with bounded_transaction(lock_timeout=TAKEOVER_LOCK_WAIT):
                    took = model.objects.filter(pk=pk, status=Status.RUNNING, lease_owner=old_owner).update(
                        lease_owner=owner, lease_expires_at=timezone.now() + timedelta(seconds=lease_seconds)
                    )
            except OperationalError:  # the row is locked: its owner stalled inside a transaction
                continue
            if took:
                taken.append((model, pk))
    return taken


def settle_orphan(model: type[StreamTask], pk: object, owner: str) -> Recovered | None:
    """A task taken by ``take_orphans``: pending again (RETRY, attempts left), or failed
    with an error event numbered after everything logged. None: no longer ours."""
    with bounded_transaction():
        task = model.objects.filter(pk=pk, status=Status.RUNNING, lease_owner=owner).first()
        if task is None:
            return None
        # Read on the row: a class's options, or a model's per-row fields of the same names.
        if task.recovery == Recovery.RETRY and task.attempts < task.max_attempts:
            model.objects.filter(pk=pk).update(status=Status.PENDING, lease_owner=None, lease_expires_at=None)
            return Recovered(model, pk, True, None, task.attempts, task.started_at)
        if task.recovery == Recovery.RETRY:
            message = f"Task interrupted on each of its {task.attempts} attempts; giving up"
        else:
            message = "Task interrupted: the server running it stopped"
        event = Event(
            next_free_seq(model, pk, task.seq_reserved),
            ERROR,
            build_payload(
                {"message": message, "type": "Interrupted"},
                task_id=task.pk,
                model_name=model.stream_name(),
            ),
        )
        if not finish(model, pk, owner, Status.FAILED, event, error=message):
            return None
        return Recovered(model, pk, False, event, task.attempts, task.started_at)


def logged_after(key: TaskKey) -> int:
    """The highest sequence number in the log of ``key`` (0: none)."""
    return TaskEvent.objects.filter(task_type=key.label, task_id=key.pk).aggregate(m=Max("seq"))["m"] or 0


# -- the event log ----------------------------------------------------------------


LogRow = tuple[TaskKey, Event, Fence | None]


def write_log(rows: list[LogRow]) -> list[LogRow]:
    """Insert events; those of a fenced run only while its row still belongs to
    that run (the check and the insert in one transaction, the rows locked on
    PostgreSQL, so a takeover commits either before or after, never between).
    Returns the rows dropped for that reason."""
    writable = [(key, event) for key, event, fence in rows if fence is None]
    groups: dict[tuple[type[StreamTask], str], list[tuple[TaskKey, Event, Fence]]] = {}
    for key, event, fence in rows:
        if fence is not None:
            groups.setdefault((fence.model, fence.owner), []).append((key, event, fence))
    dropped: list[LogRow] = []
    with bounded_transaction():
        for (model, owner), group in groups.items():
            held = _fenced(model, owner).filter(pk__in={fence.pk for _, _, fence in group})
            if connection.features.has_select_for_update:
                held = held.select_for_update()
            attempts = dict(held.values_list("pk", "attempts"))
            for key, event, fence in group:
                if attempts.get(fence.pk) == fence.attempt:
                    writable.append((key, event))
                else:
                    dropped.append((key, event, fence))
        write_events(writable)
    return dropped


def write_events(rows: "list[tuple[TaskKey, Event]]") -> None:
    """Insert (key, Event) rows; ones already there are skipped."""
    TaskEvent.objects.bulk_create(
        [
            TaskEvent(task_type=key.label, task_id=key.pk, seq=e.seq, type=e.type, payload=e.payload)
            for key, e in rows
        ],
        ignore_conflicts=True,
    )


def read_events(key: TaskKey, after: int, limit: int) -> list[Event]:
    return [
        Event(seq, type_, payload)
        for seq, type_, payload in TaskEvent.objects.filter(
            task_type=key.label, task_id=key.pk, seq__gt=after
        )
        .order_by("seq")
        .values_list("seq", "type", "payload")[:limit]
    ]


def last_event(key: TaskKey) -> Event | None:
    row = (
        TaskEvent.objects.filter(task_type=key.label, task_id=key.pk)
        .order_by("-seq")
        .values_list("seq", "type", "payload")
        .first()
    )
    return Event(*row) if row else None


def delete_events(model: type[StreamTask], pks: Iterable[object]) -> int:
    label = model._meta.label_lower
    return TaskEvent.objects.filter(task_type=label, task_id__in=[str(p) for p in pks]).delete()[0]
