"""A small client for task streams (the ``[client]`` extra: httpx and httpx-sse).

    from streaming.client import stream_events

    for event in stream_events("http://127.0.0.1:8888/stream/ExampleTask/1"):
        print(event.type, event.id, event.data)

There is no read timeout (a task may stay silent for as long as it likes). A
connection that drops before the task ends is resumed with ``Last-Event-ID``,
so no event is missed or repeated. Iteration ends after a terminal event
(``complete``, ``error``, ``cancelled``) or when the server answers 204.
"""

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    import httpx
    from httpx_sse import ServerSentEvent, SSEError, connect_sse
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "streaming.client needs httpx and httpx-sse: pip install 'django-streaming-coordinator[client]'"
    ) from exc

__all__ = [
    "DEFAULT_TIMEOUT",
    "TERMINAL_EVENTS",
    "Event",
    "StreamConnectError",
    "StreamError",
    "StreamHTTPError",
    "stream_events",
]

TERMINAL_EVENTS = frozenset({"complete", "error", "cancelled"})
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=10.0, pool=10.0)


@dataclass(frozen=True)
class Event:
    """One event: its type, its id (``None`` if it had none) and its data
    (parsed JSON; the raw text when the data is not JSON)."""

    type: str
    id: str | None
    data: Any

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


class StreamError(Exception):
    """The stream could not be read to its end."""


MAX_RETRY_AFTER = 60.0


class StreamHTTPError(StreamError):
    """The server answered with a status other than 200 or 204."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class StreamConnectError(StreamError):
    """The first connection failed (nothing listens at the URL's host and port)."""


def stream_events(
    url: str,
    *,
    last_event_id: str | None = None,
    max_reconnects: int = 20,
    client: httpx.Client | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    on_reconnect: Callable[[str | None, int], None] | None = None,
) -> Iterator[Event]:
    """Yield a stream's events until a terminal one.

    ``last_event_id``: start after this event. ``max_reconnects``: consecutive
    failed reconnects before giving up with ``StreamError``. ``client``: an
    ``httpx.Client`` to use (default: a new one). ``on_reconnect(last_id,
    attempt)`` is called before each reconnect.
    """
    if client is None:
        with httpx.Client() as own:
            yield from _stream(url, own, last_event_id, max_reconnects, timeout, on_reconnect)
    else:
        yield from _stream(url, client, last_event_id, max_reconnects, timeout, on_reconnect)


def _stream(
    url: str,
    client: httpx.Client,
    last_id: str | None,
    max_reconnects: int,
    timeout: httpx.Timeout,
    on_reconnect: Callable[[str | None, int], None] | None,
) -> Iterator[Event]:
    received = 0
    reconnects = 0
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        retry_after: float | None = None
        try:
            with connect_sse(client, "GET", url, headers=headers, timeout=timeout) as source:
                response = source.response
                if response.status_code == 204:  # nothing after our last event: it has ended
                    return
                retry_after = _retry_after(response)
                if retry_after is None and response.status_code != 200:
                    response.read()
                    message = response.text.strip() or response.reason_phrase
                    raise StreamHTTPError(response.status_code, message)
                if retry_after is not None:  # busy (at a stream limit): come back when it says
                    response.read()
                    raise _Busy
                for sse in source.iter_sse():
                    if sse.id:
                        last_id = sse.id
                    event = _event(sse)
                    if event is None:
                        continue
                    received += 1
                    reconnects = 0  # progress: only a stream that gives nothing counts against us
                    yield event
                    if event.terminal:
                        return
        except SSEError as exc:  # a 200 that is not an event stream
            raise StreamError(f"{url} is not an event stream ({exc})") from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if received == 0 and reconnects == 0:
                raise StreamConnectError(f"cannot connect to {url} ({exc}); is the server running?") from None
        except (httpx.ReadError, httpx.RemoteProtocolError, _Busy):
            pass
        # The stream ended before the task did: the server restarted or dropped us.
        reconnects += 1
        if reconnects > max_reconnects:
            raise StreamError(f"connection lost and {max_reconnects} reconnects failed")
        if on_reconnect is not None:
            on_reconnect(last_id, reconnects)
        time.sleep(retry_after if retry_after is not None else min(2.0, 0.25 * reconnects))


class _Busy(Exception):
    """A 503 with Retry-After: reconnect after that long."""


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a 503 asks the client to wait (capped at a minute), or None."""
    if response.status_code != 503:
        return None
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date: not ours to guess at
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _event(sse: ServerSentEvent) -> Event | None:
    """The event to yield, or None for a message with no data.

    The WHATWG EventSource parser dispatches nothing when a message's data
    buffer is empty, but httpx-sse (up to at least 0.4.3) dispatches an empty
    ``message`` at the blank line after every comment once an ``id:`` was
    seen (its last event id is sticky): each ``: keep-alive`` would become an
    event. httpx-sse cannot tell ``data:`` (one empty line) from no data, so
    both are dropped; our server always sends JSON data.
    """
    if not sse.data:
        return None
    try:
        data = json.loads(sse.data)
    except ValueError:
        data = sse.data
    return Event(sse.event, sse.id or None, data)
