"""/metrics: this process's figures in the Prometheus text format (STREAMING['METRICS']).

Nothing here runs per event. The objects that do the work keep plain counts
(the hub per flush and per chunk, the stream and connection limits per
connection, the event log per batch, the transport's outbox), and this module
reads them:

- One server process: when scraped (a collector reads the counts then).
- Several (``--workers N``, or any server run with PROMETHEUS_MULTIPROC_DIR
  set): a scrape reaches one of them, so each process copies its counts into
  prometheus-client's shared files once a second, and the scraped one answers
  for all (``MultiProcessCollector``). Figures lag by up to that second.

Per task (claims, run durations, recoveries) the runner tells ``Recorder``,
which observes prometheus-client's metrics directly. Task rows by model and
status are the cluster's, counted in the database when scraped: off the
node's database thread, one count at a time (``Metrics._cluster_tasks``).

Who may read: a staff user's session, or ``Authorization: Bearer`` with
METRICS_TOKEN (compared in constant time); 401 for a wrong token, 403
otherwise. prometheus-client is an optional extra: without it the endpoint
says so (503) and the node runs on.
"""

import asyncio
import logging
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from asgiref.sync import sync_to_async
from django.db import connections
from django.utils.crypto import constant_time_compare

from .. import access
from ..node import Node
from ..tasks.registry import stream_models

if TYPE_CHECKING:
    from ..models import StreamTask
    from ..tasks.run import TaskRun
    from .app import StreamingApp
    from .limits import RateLimitedLog

logger = logging.getLogger(__name__)

PATH = "/metrics"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it when first imported
PUBLISH_EVERY = 1.0  # seconds between a process's copies into the shared files (several processes)
INSTALL_HINT = "pip install 'django-streaming-coordinator[metrics]'"
# Seconds: a run (claim to end) and a queue wait (row created to first claim).
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, float("inf"))
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))


class Reply(NamedTuple):
    """An answer to a request for /metrics (web/app.py sends it)."""

    status: int
    body: str
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


class ConnectionCounts(Protocol):
    """runserver_stream's connection limits (server/protocol.py's ServerLimits)."""

    open: int
    accepted: int
    refused: "RateLimitedLog"
    timed_out: "RateLimitedLog"
    oversized: "RateLimitedLog"


# runserver_stream's connection counts of each app it serves (server/serve.py registers them).
connection_counts: "weakref.WeakKeyDictionary[StreamingApp, ConnectionCounts]" = weakref.WeakKeyDictionary()


@dataclass
class Sources:
    """What the figures are read from: one server process's parts."""

    app: "StreamingApp"
    node: Node

    @property
    def connections(self) -> ConnectionCounts | None:
        return connection_counts.get(self.app)


GaugeMode = Literal["livesum", "livemax"]
Samples = Iterable[tuple[tuple[str, ...], float]]  # (label values, value)


def _one(value: float) -> Samples:
    return [((), value)]


def _streams_refused(s: Sources) -> Samples:
    limits = s.app.stream_limits
    return [((limit,), count) for limit, count in limits.refusals.items()] if limits else []


def _connections(read: Callable[[ConnectionCounts], float]) -> Callable[[Sources], Samples]:
    def samples(s: Sources) -> Samples:
        counts = s.connections
        return _one(read(counts)) if counts is not None else []

    return samples


def _running(s: Sources) -> Samples:
    running = dict.fromkeys((model._meta.label_lower for model in stream_models()), 0)
    if s.node.runner is not None:
        for key in s.node.runner.runs:
            running[key.label] = running.get(key.label, 0) + 1
    return [((label,), count) for label, count in running.items()]


class Figure(NamedTuple):
    """One metric read from the counts. ``mode``: how the processes of ``--workers``
    combine a gauge (prometheus-client's multiprocess_mode); counters add up."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    read: Callable[[Sources], Samples]
    labels: tuple[str, ...] = ()
    mode: "GaugeMode" = "livesum"


FIGURES = (
    Figure(
        "streaming_streams_open",
        "gauge",
        "Streams open now (admitted under the stream limits)",
        lambda s: _one(s.app.stream_limits.open if s.app.stream_limits else 0),
    ),
    Figure(
        "streaming_streams_opened",
        "counter",
        "Streams admitted",
        lambda s: _one(s.app.stream_limits.opened if s.app.stream_limits else 0),
    ),
    Figure(
        "streaming_streams_refused",
        "counter",
        "Streams refused with 503 by a stream limit: streams (MAX_STREAMS), per_client, per_task",
        _streams_refused,
        ("limit",),
    ),
    Figure(
        "streaming_streams_cut_off",
        "counter",
        "Streams cut off because their client read nothing for CLIENT_SEND_TIMEOUT",
        lambda s: _one(s.node.hub.cut_off),
    ),
    Figure(
        "streaming_connections_open",
        "gauge",
        "Connections open now (runserver_stream: streams, pages, heads still arriving)",
        _connections(lambda c: c.open),
    ),
    Figure(
        "streaming_connections_accepted",
        "counter",
        "Connections accepted (runserver_stream)",
        _connections(lambda c: c.accepted),
    ),
    Figure(
        "streaming_connections_refused",
        "counter",
        "Connections refused with 503 at MAX_CONNECTIONS (runserver_stream)",
        _connections(lambda c: c.refused.total),
    ),
    Figure(
        "streaming_connections_timed_out",
        "counter",
        "Connections closed: their request head did not arrive within HEADER_TIMEOUT (runserver_stream)",
        _connections(lambda c: c.timed_out.total),
    ),
    Figure(
        "streaming_requests_oversized",
        "counter",
        "Requests refused: a head over MAX_HEADER_BYTES (431) or a URL over 8 KiB (414) (runserver_stream)",
        _connections(lambda c: c.oversized.total),
    ),
    Figure(
        "streaming_events_published",
        "counter",
        "Events published by the tasks this process runs",
        lambda s: _one(s.node.hub.published),
    ),
    Figure(
        "streaming_events_received",
        "counter",
        "Events received from other processes through the broker, for this process's clients",
        lambda s: _one(s.node.hub.received),
    ),
    Figure(
        "streaming_events_delivered",
        "counter",
        "Events written to clients (one event to 10 clients counts 10)",
        lambda s: _one(s.node.hub.delivered),
    ),
    Figure(
        "streaming_event_bytes_written",
        "counter",
        "Bytes of events written to clients",
        lambda s: _one(s.node.hub.bytes_written),
    ),
    Figure(
        "streaming_resumes",
        "counter",
        "Streams opened after an event their client had (Last-Event-ID)",
        lambda s: _one(s.node.hub.resumes),
    ),
    Figure(
        "streaming_resumes_incomplete",
        "counter",
        "Catch-ups that skipped events neither memory nor the event log held (persist_events=False)",
        lambda s: _one(s.node.hub.resumes_incomplete),
    ),
    Figure(
        "streaming_tasks_running",
        "gauge",
        "Tasks this process runs now, by model",
        _running,
        ("model",),
    ),
    Figure(
        "streaming_eventlog_written",
        "counter",
        "Events written to the event log by its batched writer (a task's terminal event is "
        "written with its final status, apart)",
        lambda s: _one(s.node.eventlog.written),
    ),
    Figure(
        "streaming_eventlog_pending",
        "gauge",
        "Events waiting to be written to the event log",
        lambda s: _one(s.node.eventlog.pending),
    ),
    Figure(
        "streaming_eventlog_lag_seconds",
        "gauge",
        "How long the oldest event not yet in the event log has waited (0: none waits)",
        lambda s: _one(s.node.eventlog.lag()),
        mode="livemax",
    ),
    Figure(
        "streaming_redis_outbox",
        "gauge",
        "Events published here and not yet sent to Redis (0 with the in-memory broker)",
        lambda s: _one(s.node.transport.backlog),
    ),
)
CLUSTER_TASKS = "streaming_cluster_tasks"
CLUSTER_TASKS_HELP = (
    "Task rows by model and status, read from the database when scraped: the whole cluster's, "
    "the same on every node (aggregate with max, not sum)"
)


TaskCounts = list[tuple[tuple[str, str], int]]


def count_tasks() -> TaskCounts:
    """Task rows by (model, status), from the database (synchronous: the ORM)."""
    from django.db.models import Count

    counts: TaskCounts = []
    for model in stream_models():
        rows = model.objects.order_by().values_list("status").annotate(n=Count("pk"))
        counts.extend(((model._meta.label_lower, status), n) for status, n in rows)
    return counts


def count_tasks_apart() -> TaskCounts:
    """``count_tasks`` on a worker thread of the default executor, not the node's
    database thread (claims, lease renewals, the event log wait behind whatever
    runs there, and a GROUP BY on a large table takes seconds). Django's
    connections are per thread: the one opened here is closed after."""
    try:
        return count_tasks()
    finally:
        connections.close_all()


class Recorder:
    """The per-task metrics (claims, run durations, recoveries), observed as they happen;
    the runner's RunObserver."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.claimed_total = Counter(
            "streaming_tasks_claimed", "Task runs claimed by this process", ("model",), registry=None
        )
        self.run_seconds = Histogram(
            "streaming_task_run_seconds",
            "Seconds from a run's claim to its end, by how it ended (completed, failed, cancelled; "
            "handed_back: the server stopped; lost: its lease was lost)",
            ("model", "outcome"),
            buckets=RUN_BUCKETS,
            registry=None,
        )
        self.queue_wait_seconds = Histogram(
            "streaming_task_queue_wait_seconds",
            "Seconds from a task row's creation to its first claim",
            ("model",),
            buckets=WAIT_BUCKETS,
            registry=None,
        )
        self.recovered_total = Counter(
            "streaming_tasks_recovered",
            "Tasks taken over after their server died, by what followed (requeued, failed)",
            ("model", "outcome"),
            registry=None,
        )
        self._children: dict[str, tuple[Any, Any]] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    @property
    def metrics(self) -> list[Any]:
        return [self.claimed_total, self.run_seconds, self.queue_wait_seconds, self.recovered_total]

    def claimed(self, run: "TaskRun", waited: float | None) -> None:
        label = run.key.label
        claimed, waits = self._children.get(label) or self._remember(label)
        claimed.inc()
        if waited is not None:
            waits.observe(waited)

    def _remember(self, label: str) -> tuple[Any, Any]:
        # A metric's labels() takes a lock and checks its values each time: once per model here.
        children = self._children[label] = (
            self.claimed_total.labels(label),
            self.queue_wait_seconds.labels(label),
        )
        return children

    def ended(self, run: "TaskRun", outcome: str, seconds: float) -> None:
        key = (run.key.label, str(outcome))
        durations = self._durations.get(key) or self._durations.setdefault(key, self.run_seconds.labels(*key))
        durations.observe(seconds)

    def recovered(self, model: "type[StreamTask]", requeued: bool) -> None:
        self.recovered_total.labels(model._meta.label_lower, "requeued" if requeued else "failed").inc()


class Families:
    """Metric families as a prometheus-client collector (what generate_latest reads)."""

    def __init__(self, *collectors: Any) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Any]:
        for collector in self.collectors:
            yield from collector.collect()


class Fixed:
    """Metric families read already, as a collector."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        return iter(self.families)


class Metrics:
    """The metrics of one server process: its figures, its per-task recorder, and /metrics."""

    def __init__(self, app: "StreamingApp", node: Node) -> None:
        self.sources = Sources(app, node)
        self.settings = node.settings
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        self.installed = True
        self._publisher: asyncio.Task[None] | None = None
        self._published: dict[tuple[str, tuple[str, ...]], float] = {}  # what the shared files hold
        self._counting: asyncio.Task[None] | None = None  # the count of task rows in flight
        self._counts: TaskCounts | None = None  # the last one's figures (None: none, or it failed)
        try:
            self.recorder = Recorder()
        except ImportError:
            self.installed = False
            logger.warning(
                "STREAMING['METRICS'] is on, but prometheus-client is not installed: %s", INSTALL_HINT
            )
            return
        if node.runner is not None:
            node.runner.observer = self.recorder
        if self.multiprocess:
            self._shared = self._shared_metrics()
            self._publish()
            self._publisher = asyncio.create_task(self._publish_every_second(), name="streaming-metrics")

    async def stop(self) -> None:
        if self._counting is not None:  # stops the wait, not the query: its thread ends on its own
            self._counting.cancel()
            await asyncio.gather(self._counting, return_exceptions=True)
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
            self._publisher = None
            self._publish()  # the last counts, after the node stopped

    # -- /metrics ------------------------------------------------------------------

    async def answer(self, method: str, headers: Iterable[tuple[bytes, bytes]]) -> Reply:
        """The answer to a request for /metrics: who asks first, then the figures."""
        if method not in ("GET", "HEAD"):
            return Reply(405, f"Method {method} not allowed; use GET\n", headers=((b"allow", b"GET, HEAD"),))
        refused = await self._refusal(dict(headers))
        if refused is not None:
            return refused
        if not self.installed:
            return Reply(503, f"Metrics need prometheus-client: {INSTALL_HINT}\n")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        cluster = await self._cluster_tasks()
        families = Families(*self._collectors(), *cluster)
        return Reply(200, generate_latest(families).decode(), content_type=CONTENT_TYPE_LATEST.encode())

    async def _refusal(self, headers: dict[bytes, bytes]) -> Reply | None:
        """None when the request may read the metrics: METRICS_TOKEN as a bearer
        token, or the session of a staff user. Nothing else is said (no figure, no
        hint whether a token is configured)."""
        authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            token = self.settings.METRICS_TOKEN
            if token and constant_time_compare(credentials.strip(), token):
                return None
            challenge = b'Bearer realm="metrics", error="invalid_token"'
            return Reply(401, "Invalid metrics token\n", headers=((b"www-authenticate", challenge),))
        session = access.session_key(headers)
        user = await sync_to_async(access.session_user)(session) if session else None
        if user is not None and getattr(user, "is_staff", False):
            return None
        return Reply(403, "Metrics are for staff users and scrapers with the metrics token\n")

    def _collectors(self) -> list[Any]:
        if self.multiprocess:
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(registry)
            return [registry]
        return [Counts(self.sources), *self.recorder.metrics]

    async def _cluster_tasks(self) -> list[Any]:
        """The task rows' counts as one collector. One count at a time, off the node's
        database thread: a scrape starts one unless one is in flight, and waits for it
        up to READY_TIMEOUT; past that (the count goes on) it answers with the last
        count's figures, or without them if there is none (or the last one failed)."""
        from prometheus_client.core import GaugeMetricFamily

        if self._counting is None:
            self._counting = asyncio.create_task(self._count(), name="streaming-metrics-count")
        # asyncio.wait: a scrape that stops waiting (or is cancelled) leaves the count running.
        done, _ = await asyncio.wait({self._counting}, timeout=self.settings.READY_TIMEOUT)
        counts = self._counts
        if not done:
            logger.warning(
                "/metrics: counting the task rows takes over READY_TIMEOUT (%s s); %s",
                self.settings.READY_TIMEOUT,
                "answering with the last count" if counts is not None else "leaving them out",
            )
        if counts is None:
            return []
        family = GaugeMetricFamily(CLUSTER_TASKS, CLUSTER_TASKS_HELP, labels=("model", "status"))
        for labels, count in counts:
            family.add_metric(labels, count)
        return [Fixed([family])]

    async def _count(self) -> None:
        try:
            self._counts = await sync_to_async(count_tasks_apart, thread_sensitive=False)()
        except Exception as exc:
            self._counts = None
            logger.warning(
                "/metrics: counting the task rows failed (%s); leaving them out", type(exc).__name__
            )
        finally:
            self._counting = None

    # -- several processes: each copies its counts into the shared files ----------------

    def _shared_metrics(self) -> dict[str, Any]:
        from prometheus_client import Counter, Gauge

        shared: dict[str, Any] = {}
        for figure in FIGURES:
            if figure.kind == "counter":
                shared[figure.name] = Counter(figure.name, figure.help, figure.labels, registry=None)
            else:
                shared[figure.name] = Gauge(
                    figure.name, figure.help, figure.labels, registry=None, multiprocess_mode=figure.mode
                )
        return shared

    async def _publish_every_second(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY)
            try:
                self._publish()
            except Exception:
                logger.exception("Publishing the metrics failed; trying again")

    def _publish(self) -> None:
        """Counters grow by what this process counted since the last copy; gauges are set."""
        for figure in FIGURES:
            metric = self._shared[figure.name]
            for labels, value in figure.read(self.sources):
                child = metric.labels(*labels) if labels else metric
                if figure.kind == "counter":
                    before = self._published.get((figure.name, labels), 0)
                    if value > before:
                        child.inc(value - before)
                        self._published[figure.name, labels] = value
                else:
                    child.set(value)


class Counts:
    """The figures as a prometheus-client collector, read when scraped (one process)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for figure in FIGURES:
            kind = CounterMetricFamily if figure.kind == "counter" else GaugeMetricFamily
            family = kind(figure.name, figure.help, labels=figure.labels)
            for labels, value in figure.read(self.sources):
                family.add_metric(labels, value)
            yield family
