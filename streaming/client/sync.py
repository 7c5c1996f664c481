"""The blocking client: ``TaskStream``, ``MultiStream`` and ``stream_events``."""

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from time import sleep
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import SSEError, connect_sse

from .protocol import (
    DEFAULT_MAX_DELAY,
    DEFAULT_RETRY,
    Event,
    MuxState,
    ReadState,
    Reconnects,
    StreamError,
    StreamState,
    TaskSpec,
    outcome_from_status,
    outcome_of,
    parse_task,
    request_headers,
    task_url,
)

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=10.0, pool=10.0)
# What a dropped or failed connection raises: worth a reconnect.
RETRYABLE = (httpx.TransportError,)
CONNECTING = (httpx.ConnectError, httpx.ConnectTimeout)

OnReconnect = Callable[[str | None, int], None]


class _Reader:
    """Reads a stream to its end, reconnecting as ``state`` says."""

    state: ReadState

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        max_reconnects: int | None,
        retry: float,
        max_delay: float,
        client: httpx.Client | None,
        timeout: httpx.Timeout,
        headers: Mapping[str, str] | None,
        rand: Callable[[], float],
    ) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self.headers = headers
        self._client = client
        self._own_client: httpx.Client | None = None
        self.reconnects = Reconnects(
            url, max_reconnects=max_reconnects, retry=retry, max_delay=max_delay, rand=rand
        )

    @property
    def ended(self) -> bool:
        return self.state.ended

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self) -> Iterator[Event]:
        """The events from where the stream stands to its end."""
        client = self._http()
        state = self.state
        self.reconnects.failures = 0  # iterating again (after giving up, say) starts a new count
        while not state.ended:
            try:
                with connect_sse(
                    client,
                    "GET",
                    self.url,
                    params=state.params() or None,  # (an empty list would drop the URL's own query)
                    headers=state.headers(self.token, self.headers),
                    timeout=self.timeout,
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
            self._reconnecting()
            sleep(delay)

    def _reconnecting(self) -> None:
        pass

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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TaskStream(_Reader):
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
    ``last_event_id=0`` reads the task's events from its first.

    Iterating again continues after the last event handed out.
    """

    state: StreamState

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
        super().__init__(
            task_url(url, model, task_id) if model is not None else url,
            token=token,
            max_reconnects=max_reconnects,
            retry=retry,
            max_delay=max_delay,
            client=client,
            timeout=timeout,
            headers=headers,
            rand=rand,
        )
        self.on_reconnect = on_reconnect
        self.state = StreamState(self.url, last_event_id, self.reconnects)

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event handed out (where a new stream would resume)."""
        return self.state.last_event_id

    @property
    def terminal(self) -> Event | None:
        """The terminal event, once it has been read (None after a 204)."""
        return self.state.terminal

    def _reconnecting(self) -> None:
        if self.on_reconnect is not None:
            self.on_reconnect(self.state.last_event_id, self.reconnects.failures)

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
        return outcome_from_status(self.url, self.status())

    def status(self) -> Any:
        """The task's JSON status now (``status``, ``final_value``, ``error``, ...)."""
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


class MultiStream(_Reader):
    """Several tasks (and model feeds) on one connection: the multiplexed stream.

        with MultiStream("http://127.0.0.1:8888", ["ExampleTask/1", "ExampleTask/2"]) as stream:
            for event in stream:
                print(event.task, event.type, event.data)  # event.task: (model, task id)
            print(stream.terminals)  # (model, task id): its complete / error / cancelled event

    ``tasks``: ``"Model/id"`` (or ``"app_label/Model/id"``, or a ``(model,
    id)`` tuple), with ``@<last event id>`` to start after that event.
    ``feeds``: models (``"Model"``) whose running tasks, and every task that
    starts later, join the stream; a stream with a feed does not end by
    itself. ``history=True``: tasks without a cursor from their first event.
    It keeps a cursor per task and reconnects with them
    (``task=<Model>/<id>@<cursor>``); it ends once every task has sent its
    terminal event. Reconnects, token and errors as for ``TaskStream``.
    """

    state: MuxState

    def __init__(
        self,
        base_url: str,
        tasks: Iterable[TaskSpec] = (),
        *,
        feeds: Iterable[str] = (),
        history: bool = False,
        token: str | None = None,
        max_reconnects: int | None = 20,
        retry: float = DEFAULT_RETRY,
        max_delay: float = DEFAULT_MAX_DELAY,
        client: httpx.Client | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(
            f"{base_url.rstrip('/')}/stream/",
            token=token,
            max_reconnects=max_reconnects,
            retry=retry,
            max_delay=max_delay,
            client=client,
            timeout=timeout,
            headers=headers,
            rand=rand,
        )
        tracked = [parse_task(spec) for spec in tasks]
        self.state = MuxState(self.url, tracked, list(feeds), self.reconnects, history=history)

    @property
    def cursors(self) -> dict[tuple[str, str], int | None]:
        """``(model, task id)``: the id of the last event of each task seen so far."""
        return self.state.cursors

    @property
    def terminals(self) -> dict[tuple[str, str], Event]:
        """``(model, task id)``: the terminal event of each task that has ended."""
        return self.state.terminals


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
