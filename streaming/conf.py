"""The STREAMING settings dict, with its documented defaults."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import cache
from typing import Any, get_args, get_origin, get_type_hints

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
    # A run stops itself (process() cancelled, nothing more sent) once
    # LEASE_SECONDS - LEASE_MARGIN seconds have passed on this node's
    # monotonic clock since its last successful renewal began, so it is over
    # before any other node can take the task over; the margin covers clock
    # skew between nodes and the database. None: LEASE_SECONDS / 5 (3 s).
    LEASE_MARGIN: float | None = None
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
    # /ready answers 503 when the database (or Redis) does not answer within this.
    READY_TIMEOUT: float = 2.0
    # Whether this server also runs tasks (False: it only serves streams).
    RUN_TASKS: bool = True
    # The queues of Django's tasks framework (streaming.taskbackend) whose
    # tasks this server runs, e.g. ("emails",); empty: every queue.
    TASK_QUEUES: tuple[str, ...] = ()
    # Redis broker: entries kept per task stream (approximate cap), and how
    # long a finished task's stream stays in Redis (the event log keeps all).
    REDIS_STREAM_MAXLEN: int = 10_000
    REDIS_STREAM_TTL: float = 3600.0

    # -- Browsers of other origins (CORS) --
    # Origins whose pages may open streams and read statuses, e.g.
    # ("https://app.example.com",); "*" lets any origin (without cookies).
    # A request from any other origin is refused (403). Same-origin pages
    # need nothing here.
    CORS_ALLOWED_ORIGINS: tuple[str, ...] = ()
    # Whether an allowed origin's page may stream with the user's session
    # cookie (EventSource(url, {withCredentials: true})). Off: such a page
    # streams with a token only, and its cookies are ignored.
    CORS_ALLOW_CREDENTIALS: bool = False

    # -- Limits (per server process); over one, a 503 with Retry-After --
    # Open streams in all.
    MAX_STREAMS: int = 20_000
    # Open streams per client address (see TRUSTED_PROXIES behind a proxy).
    MAX_STREAMS_PER_CLIENT: int = 500
    # Open streams per task (None: only MAX_STREAMS applies).
    MAX_STREAMS_PER_TASK: int | None = None
    # Open connections of any kind (streams, pages, requests still arriving).
    # None: the file-descriptor limit (raised to its hard limit at start)
    # less a reserve for the database, Redis and files.
    MAX_CONNECTIONS: int | None = None
    # A client must send its whole request line and headers within this many
    # seconds of connecting (slowloris, idle sockets): 408, then closed.
    HEADER_TIMEOUT: float = 10.0
    # Most bytes of request line and headers (431 over it; 414 for a URL
    # over 8 KiB).
    MAX_HEADER_BYTES: int = 64 * 1024
    # Peers whose X-Forwarded-For names the client (your reverse proxy), as
    # addresses or networks; the client's address is then the nearest
    # untrusted one in that header. Others are counted by their own address.
    TRUSTED_PROXIES: tuple[str, ...] = ("127.0.0.1", "::1")

    # -- Metrics (the [metrics] extra: prometheus-client) --
    # Serve /metrics in the Prometheus text format. Off by default: the path
    # stays your project's, and nothing extra runs.
    METRICS: bool = False
    # A bearer token for scrapers (Authorization: Bearer <token>), at least
    # 16 characters; staff users' sessions may read /metrics too. None: only them.
    METRICS_TOKEN: str | None = None

    # -- The dashboard (streaming.urls) --
    # Who may open it: the dotted path of a function (user) -> bool, e.g.
    # "myproject.access.may_see_tasks". None: active staff users. Past this
    # gate, each model's tasks still need its view permission, and actions
    # its change (cancel, start) or add (re-run) permission.
    DASHBOARD_ACCESS: str | None = None


def lease_margin(settings: StreamingSettings) -> float:
    """The effective LEASE_MARGIN; it must leave a run more than one renewal interval."""
    margin = settings.LEASE_SECONDS / 5 if settings.LEASE_MARGIN is None else settings.LEASE_MARGIN
    if not 0 <= margin < settings.LEASE_SECONDS * 2 / 3:
        raise ImproperlyConfigured(
            f"STREAMING['LEASE_MARGIN'] = {margin:g} must be at least 0 and less than two thirds of "
            f"LEASE_SECONDS ({settings.LEASE_SECONDS:g}): leases are renewed every third of it"
        )
    return margin


@cache
def get_settings() -> StreamingSettings:
    given = getattr(django_settings, "STREAMING", {}) or {}
    known = {f.name for f in fields(StreamingSettings)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown STREAMING setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
        )
    # A list where a tuple is documented (["https://a.example"]) is what people write.
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}
    settings = replace(StreamingSettings(), **given)
    lease_margin(settings)  # a bad one fails at start-up
    for name in ("MAX_STREAMS", "MAX_STREAMS_PER_CLIENT"):
        if not isinstance(getattr(settings, name), int) or getattr(settings, name) < 1:
            raise ImproperlyConfigured(f"STREAMING['{name}'] must be a positive number of streams")
    if not isinstance(settings.METRICS, bool):
        raise ImproperlyConfigured(f"STREAMING['METRICS'] must be True or False, not {settings.METRICS!r}")
    token = settings.METRICS_TOKEN
    if token is not None and (not isinstance(token, str) or len(token.strip()) < MIN_TOKEN_LENGTH):
        raise ImproperlyConfigured(
            f"STREAMING['METRICS_TOKEN'] must be a string of at least {MIN_TOKEN_LENGTH} characters "
            "(a random one: python -c 'import secrets; print(secrets.token_urlsafe(32))'), or None"
        )
    return settings


MIN_TOKEN_LENGTH = 16  # a shorter bearer token is guessable


def from_environ(prefix: str = "STREAMING_", environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """STREAMING settings given as environment variables (``STREAMING_MAX_STREAMS=5000``,
    ``STREAMING_CORS_ALLOWED_ORIGINS=https://a.example,https://b.example``), parsed by
    each setting's type; variables that are unset or empty are left out.

    For a settings module that takes its configuration from the environment::

        STREAMING = {**from_environ(), "BROKER_URL": "redis://..."}
    """
    environ = os.environ if environ is None else environ
    hints = get_type_hints(StreamingSettings)
    values: dict[str, Any] = {}
    for field in fields(StreamingSettings):
        raw = environ.get(prefix + field.name, "").strip()
        if not raw:
            continue
        try:
            values[field.name] = _parse_setting(hints[field.name], raw)
        except ValueError:
            raise ImproperlyConfigured(
                f"{prefix}{field.name}={raw!r}: expected {hints[field.name]}"
            ) from None
    return values


def _parse_setting(hint: Any, raw: str) -> Any:
    if get_origin(hint) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    optional = type(None) in get_args(hint)
    if optional and raw.lower() == "none":
        return None
    kind = next(kind for kind in get_args(hint) if kind is not type(None)) if optional else hint
    if kind is bool:
        if raw.lower() not in _BOOLEANS:
            raise ValueError(raw)
        return _BOOLEANS[raw.lower()]
    return kind(raw)


_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def reset_settings_cache(**_kwargs: object) -> None:
    get_settings.cache_clear()
