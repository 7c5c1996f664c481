"""The asyncio client: ``AsyncTaskStream`` and ``AsyncMultiStream``."""

import random
from asyncio import sleep
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import SSEError, aconnect_sse

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
from .sync import CONNECTING, DEFAULT_TIMEOUT, RETRYABLE, OnReconnect


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
        client: httpx.AsyncClient | None,
        timeout: httpx.Timeout,
        headers: Mapping[str, str] | None,
        rand: Callable[[], float],
    ) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout
        self.headers = headers
        self._client = client
        self._own_client: httpx.AsyncClient | None = None
        self.reconnects = Reconnects(
            url, max_reconnects=max_reconnects, retry=retry, max_delay=max_delay, rand=rand
        )

    @property
    def ended(self) -> bool:
        return self.state.ended

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """The events from where the stream stands to its end."""
        client = self._http()
        state = self.state
        self.reconnects.failures = 0  # iterating again (after giving up, say) starts a new count
        while not state.ended:
            try:
                async with aconnect_sse(
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
                        await response.aread()
                        delay = self.reconnects.refused(response.status_code, response.headers, response.text)
                    else:
                        async for sse in source.aiter_sse():
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
            await sleep(delay)

    def _reconnecting(self) -> None:
        pass

    def _http(self) -> httpx.AsyncClient:
        if self._client is not None:
            return self._client
        if self._own_client is None:
            self._own_client = httpx.AsyncClient()
        return self._own_client

    async def aclose(self) -> None:
        """Close the HTTP client this stream made (not one it was given)."""
        if self._own_client is not None:
            await self._own_client.aclose()
            self._own_client = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class AsyncTaskStream(_Reader):
    """``TaskStream`` for asyncio: ``async for event in stream``, ``await stream.result()``.

        async with AsyncTaskStream("http://127.0.0.1:8888", "Report", 7) as stream:
            async for event in stream:
                print(event.type, event.data)
            value = await stream.result()

    Same arguments and behaviour as ``TaskStream``; ``client`` is an ``httpx.AsyncClient``.
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
        client: httpx.AsyncClient | None = None,
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

    async def result(self) -> Any:
        """The task's return value (the ``final_value`` of its JSON status).

        Reads the stream to its end first (events not yet read are skipped).
        Raises ``TaskFailed`` (``error_type``, ``message``) or
        ``TaskCancelled`` for a task that did not complete, and the stream's
        own errors (``StreamError`` and its kinds) as iteration does.
        """
        async for _ in self.events():
            pass
        if self.state.terminal is not None:
            known, value = outcome_of(self.state.terminal)
            if known:
                return value
        return outcome_from_status(self.url, await self.status())

    async def status(self) -> Any:
        """The task's JSON status now (``status``, ``final_value``, ``error``, ...)."""
        client = self._http()
        headers = request_headers(None, self.token, self.headers)
        headers["Accept"] = "application/json"
        reconnects = self.reconnects.fresh()
        while True:
            try:
                response = await client.get(self.url, headers=headers, timeout=self.timeout)
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise StreamError(f"{self.url} did not answer with JSON") from None
                delay = reconnects.refused(response.status_code, response.headers, response.text)
            except RETRYABLE as exc:
                delay = reconnects.dropped(exc, connecting=isinstance(exc, CONNECTING))
            await sleep(delay)


class AsyncMultiStream(_Reader):
    """``MultiStream`` for asyncio: ``async for event in stream``.

    Same arguments and behaviour as ``MultiStream``; ``client`` is an ``httpx.AsyncClient``.
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
        client: httpx.AsyncClient | None = None,
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
