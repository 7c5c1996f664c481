"""A Python client of task streams (the ``[client]`` extra: httpx and httpx-sse).

    from streaming.client import TaskStream

    with TaskStream("http://127.0.0.1:8888", "ExampleTask", 1) as stream:
        for event in stream:
            print(event.type, event.id, event.data)
        print(stream.result())  # the task's return value, or TaskFailed / TaskCancelled

``AsyncTaskStream`` is the same for asyncio (``async for``, ``await
stream.result()``); ``stream_events(url)`` is the plain generator.
``MultiStream`` / ``AsyncMultiStream`` read several tasks (and model feeds)
on one connection, the multiplexed stream, with a cursor per task.

There is no read timeout (a task may stay silent for as long as it likes). A
connection that drops before the task ends is resumed with ``Last-Event-ID``,
so no event is missed or repeated, after the server's ``retry:`` time with
jitter and backoff. Iteration ends after a terminal event (``complete``,
``error``, ``cancelled``) or when the server answers 204. A 400, 401, 403,
404 or 405 raises ``StreamHTTPError`` at once; a 503 with Retry-After, other
5xx and dropped connections are retried.

The client needs neither Django nor the rest of this package.
"""

try:
    import httpx  # noqa: F401
    import httpx_sse  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "streaming.client needs httpx and httpx-sse: pip install 'django-streaming-coordinator[client]'"
    ) from exc

from .aio import AsyncMultiStream, AsyncTaskStream
from .protocol import (
    ACCESS_EXPIRED,
    MAX_RETRY_AFTER,
    TERMINAL_EVENTS,
    AccessExpired,
    Event,
    StreamConnectError,
    StreamError,
    StreamGaveUp,
    StreamHTTPError,
    TaskCancelled,
    TaskError,
    TaskFailed,
)
from .sync import DEFAULT_TIMEOUT, MultiStream, TaskStream, stream_events

__all__ = [
    "ACCESS_EXPIRED",
    "DEFAULT_TIMEOUT",
    "MAX_RETRY_AFTER",
    "TERMINAL_EVENTS",
    "AccessExpired",
    "AsyncMultiStream",
    "AsyncTaskStream",
    "Event",
    "MultiStream",
    "StreamConnectError",
    "StreamError",
    "StreamGaveUp",
    "StreamHTTPError",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskStream",
    "stream_events",
]
