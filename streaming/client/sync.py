"""The blocking client: ``TaskStream`` and ``stream_events``."""

import random
from time import sleep
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from .protocol import (
    DEFAULT_MAX_DELAY,
    DEFAULT_RETRY,
    Event,
    Reconnects,
    StreamError,
    StreamState,
    outcome_from_status,
    outcome_of,
    request_headers,
    task_url,
)

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=10.0, pool=10.0)
# What a dropped or failed connection raises: worth a reconnect.
RETRYABLE = (httpx.TransportError,)
CONNECTING = (httpx.ConnectError, httpx.ConnectTimeout)

OnReconnect = Callable[[str | None, int], None]


class TaskStream:
    """A task's event stream: iterate it for the events, ``result()`` for the outcome.

        with TaskStream("http://127.0.0.1:8888", "Report", 7, token=token) as stream:
            for event in stream:
                print(event.type, event.data)
            value = stream.result()  # or raises TaskFailed / TaskCancelled

    Name the stream by its URL (``TaskStream(url)``) or by base URL, model and
    id. A dropped connection is resumed after the last event with
    ``Last-Event-ID``, so nothing is missed or repeated; the wait before each
    reconnect is the server's ``retry:`` (``retry`` seconds until it sends
    one), doubled for each reconnect in a row that brings no event, at most
    ``max_delay``, spread by up to half again. ``max_reconnects`` such
    reconnects in a row, and it gives up (``StreamGaveUp``; None: never).
    Iteration ends after the terminal event (``complete``, ``error``,
    ``cancelled``) or a 204 (the task had ended before ``last_event_id``).

    Iterating again continues after the last event handed out.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        task_id: object = None,
        *,
        token: str | None = None,
        last_event_id: str | int | None = None,
        max_reconnects: int | None = 20,
        retry: float = DEFAULT_RETRY,
        max_delay: float = DEFAULT_MAX_DELAY,
        client: httpx.Client | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        on_reconnect: OnReconnect | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if (model is None) != (task_id is None):
            raise TypeError("give both model and task_id (with a base URL), or a stream URL alone")
        self.url = task_url(url, model, task_id) if model is not None else url
        self.token = token
        self.timeout = timeout
        self.headers = headers
        self.on_reconnect = on_reconnect
        self._client = client
        self._own_client: httpx.Client | None = None
        self.reconnects = Reconnects(
            self.url, max_reconnects=max_reconnects, retry=retry, max_delay=max_delay, rand=rand
        )
        self.state = StreamState(self.url, last_event_id, self.reconnects)

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event handed out (where a new stream would resume)."""
        return self.state.last_event_id

    @property
    def terminal(self) -> Event | None:
        """The terminal event, once it has been read (None after a 204)."""
        return self.state.terminal

    @property
    def ended(self) -> bool:
        return self.state.ended

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self) -> Iterator[Event]:
        """The events from where the stream stands to the end."""
        client = self._http()
        state = self.state
        while not state.ended:
            try:
                with connect_sse(
                    client, "GET", self.url, headers=self._headers(), timeout=self.timeout
                ) as source:
                    response = source.response
                    opening = self.reconnects.opened(response.status_code)
                    if opening == "ended":
                        state.no_more_events()
                        return
                    if opening == "refused":
                        response.read()
                        delay = self.reconnects.refused(response.status_code, response.headers, response.text)
                    else:
                        for sse in source.iter_sse():
                            event = state.receive(sse)
                            if event is not None:
                                yield event
                                if state.ended:
                                    return
                        delay = self.reconnects.dropped(None)
            except SSEError as exc:  # a 200 that is not an event stream
                raise StreamError(f"{self.url} is not an event stream ({exc})") from None
            except RETRYABLE as exc:
                delay = self.reconnects.dropped(exc, connecting=isinstance(exc, CONNECTING))
            if self.on_reconnect is not None:
                self.on_reconnect(state.last_event_id, self.reconnects.failures)
            sleep(delay)

    def result(self) -> Any:
        """The task's return value (the ``final_value`` of its JSON status).

        Reads the stream to its end first (events not yet read are skipped).
        Raises ``TaskFailed`` (``error_type``, ``message``) or
        ``TaskCancelled`` for a task that did not complete, and the stream's
        own errors (``StreamError`` and its kinds) as iteration does.
        """
        for _ in self.events():
            pass
        if self.state.terminal is not None:
            known, value = outcome_of(self.state.terminal)
            if known:
                return value
        return outcome_from_status(self.url, self._status())

    def status(self) -> dict[str, Any]:
        """The task's JSON status now (``status``, ``final_value``, ``error``, ...)."""
        return self._status()

    def _status(self) -> Any:
        client = self._http()
        headers = request_headers(None, self.token, self.headers)
        headers["Accept"] = "application/json"
        reconnects = self.reconnects.fresh()
        while True:
            try:
                response = client.get(self.url, headers=headers, timeout=self.timeout)
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise StreamError(f"{self.url} did not answer with JSON") from None
                delay = reconnects.refused(response.status_code, response.headers, response.text)
            except RETRYABLE as exc:
                delay = reconnects.dropped(exc, connecting=isinstance(exc, CONNECTING))
            sleep(delay)

    def _headers(self) -> dict[str, str]:
        return request_headers(self.state.last_event_id, self.token, self.headers)

    def _http(self) -> httpx.Client:
        if self._client is not None:
            return self._client
        if self._own_client is None:
            self._own_client = httpx.Client()
        return self._own_client

    def close(self) -> None:
        """Close the HTTP client this stream made (not one it was given)."""
        if self._own_client is not None:
            self._own_client.close()
            self._own_client = None

    def __enter__(self) -> "TaskStream":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def stream_events(
    url: str,
    *,
    last_event_id: str | None = None,
    max_reconnects: int = 20,
    client: httpx.Client | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    on_reconnect: OnReconnect | None = None,
    token: str | None = None,
) -> Iterator[Event]:
    """Yield a stream's events until a terminal one (``TaskStream`` as a generator).

    ``last_event_id``: start after this event. ``max_reconnects``: reconnects
    in a row that bring no event before giving up with ``StreamError``.
    ``client``: an ``httpx.Client`` to use (default: a new one).
    ``on_reconnect(last_id, attempt)`` is called before each reconnect.
    """
    with TaskStream(
        url,
        token=token,
        last_event_id=last_event_id,
        max_reconnects=max_reconnects,
        client=client,
        timeout=timeout,
        on_reconnect=on_reconnect,
    ) as stream:
        yield from stream
