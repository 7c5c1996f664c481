"""The asyncio client: ``AsyncTaskStream``, ``TaskStream`` for ``async for`` and ``await``."""

import random
from asyncio import sleep
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

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
from .sync import CONNECTING, DEFAULT_TIMEOUT, RETRYABLE, OnReconnect


class AsyncTaskStream:
    """``TaskStream`` for asyncio: ``async for event in stream``, ``await stream.result()``.

        async with AsyncTaskStream("http://127.0.0.1:8888", "Report", 7) as stream:
            async for event in stream:
                print(event.type, event.data)
            value = await stream.result()

    Same arguments and behaviour as ``TaskStream``; ``client`` is an
    ``httpx.AsyncClient``.
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
        client: httpx.AsyncClient | None = None,
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
        self._own_client: httpx.AsyncClient | None = None
        self.reconnects = Reconnects(
            self.url, max_reconnects=max_reconnects, retry=retry, max_delay=max_delay, rand=rand
        )
        self.state = StreamState(self.url, last_event_id, self.reconnects)

    @property
    def last_event_id(self) -> str | None:
        return self.state.last_event_id

    @property
    def terminal(self) -> Event | None:
        return self.state.terminal

    @property
    def ended(self) -> bool:
        return self.state.ended

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """The events from where the stream stands to the end."""
        client = self._http()
        state = self.state
        while not state.ended:
            try:
                async with aconnect_sse(
                    client, "GET", self.url, headers=self._headers(), timeout=self.timeout
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
            if self.on_reconnect is not None:
                self.on_reconnect(state.last_event_id, self.reconnects.failures)
            await sleep(delay)

    async def result(self) -> Any:
        """The task's return value; see ``TaskStream.result``."""
        async for _ in self.events():
            pass
        if self.state.terminal is not None:
            known, value = outcome_of(self.state.terminal)
            if known:
                return value
        return outcome_from_status(self.url, await self._status())

    async def status(self) -> Any:
        """The task's JSON status now (``status``, ``final_value``, ``error``, ...)."""
        return await self._status()

    async def _status(self) -> Any:
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

    def _headers(self) -> dict[str, str]:
        return request_headers(self.state.last_event_id, self.token, self.headers)

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

    async def __aenter__(self) -> "AsyncTaskStream":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
