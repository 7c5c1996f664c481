"""Sinks: where a subscriber's bytes go. The socket sink is server/sockets.py."""

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol


class Sink(Protocol):
    """Where one subscriber's bytes go (server/sockets.py's socket, or subscribe()'s queue)."""

    @property
    def paused(self) -> bool:
        """Holds enough unsent data: write nothing more until drain()."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Return once ``paused`` is False again."""

    def end(self) -> None:
        """The stream is over: send what is buffered, then close."""

    def abort(self) -> None:
        """Cut off a client that reads nothing."""


class QueueSink:
    """The sink behind ``subscribe()``: at most one chunk waits for the consumer."""

    __slots__ = ("_ready", "_space", "chunks", "ended", "paused")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.paused = False
        self.ended = False
        self._ready: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.paused = True
        self._wake_consumer()

    def end(self) -> None:
        self.ended = True
        self._wake_consumer()

    abort = end

    def take(self) -> bytes | None:
        if not self.chunks:
            return None
        chunk = self.chunks.pop(0)
        if not self.chunks:
            self.paused = False
            if self._space is not None and not self._space.done():
                self._space.set_result(None)
        return chunk

    async def consume(self) -> AsyncIterator[bytes]:
        """What is written, chunk by chunk, until the stream ends."""
        while True:
            chunk = self.take()
            if chunk is not None:
                yield chunk
            elif self.ended:
                return
            else:
                await self.wait()

    async def wait(self) -> None:
        """Until something is written or the stream ends."""
        self._ready = asyncio.get_running_loop().create_future()
        try:
            await self._ready
        finally:
            self._ready = None

    async def drain(self) -> None:
        while self.paused and not self.ended:
            if self._space is None or self._space.done():  # several writers (a mux) share one wait
                self._space = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._space)

    def _wake_consumer(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
