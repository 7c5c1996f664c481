"""The STREAMING settings dict, with its documented defaults."""

from dataclasses import dataclass, fields, replace
from functools import cache

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class StreamingSettings:
    # Where events fan out: None or "memory://" for the in-process broker.
    BROKER_URL: str | None = None
    # How often the runner looks for pending rows and cancel requests written
    # by other processes (rows created in-process wake it at once).
    POLL_INTERVAL: float = 0.2
    # A running task's lease; renewed every LEASE_SECONDS / 3. A lease that
    # runs out marks the task as orphaned (its server died).
    LEASE_SECONDS: float = 15.0
    # Most tasks one server runs at a time; the rest wait as pending.
    MAX_CONCURRENT_TASKS: int = 1000
    # Events kept in memory per task for late joiners and resumes; older
    # ones are read back from the event log.
    HISTORY_SIZE: int = 1000
    # Event-log writes are batched: one insert per interval or per batch.
    EVENT_FLUSH_INTERVAL: float = 0.05
    EVENT_BATCH_SIZE: int = 500
    # An SSE comment goes to a stream that has been idle this long.
    KEEPALIVE_INTERVAL: float = 15.0
    # A client whose socket accepts nothing for this long is disconnected; it
    # can resume with Last-Event-ID.
    CLIENT_SEND_TIMEOUT: float = 30.0
    # Most bytes written to a client at once (a lagging client catches up in
    # chunks of this size, never more in memory).
    MAX_CHUNK_BYTES: int = 256 * 1024
    # Default poll interval of StreamTask.wait_until().
    WAIT_POLL_INTERVAL: float = 0.5
    # On shutdown (SIGTERM, Ctrl+C), running tasks get this long to finish
    # before they are interrupted (and retried or failed by their recovery
    # policy). 25 s fits Kubernetes' default 30 s before SIGKILL; a second
    # SIGTERM or Ctrl+C ends the wait at once.
    SHUTDOWN_GRACE: float = 25.0
    # Whether this server also runs tasks (False: it only serves streams).
    RUN_TASKS: bool = True
    # Redis broker: entries kept per task stream (approximate cap), and how
    # long a finished task's stream stays in Redis (the event log keeps all).
    REDIS_STREAM_MAXLEN: int = 10_000
    REDIS_STREAM_TTL: float = 3600.0


@cache
def get_settings() -> StreamingSettings:
    given = getattr(django_settings, "STREAMING", {}) or {}
    known = {f.name for f in fields(StreamingSettings)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown STREAMING setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
        )
    return replace(StreamingSettings(), **given)


def reset_settings_cache(**_kwargs: object) -> None:
    get_settings.cache_clear()
