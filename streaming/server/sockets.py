"""A stream written straight to its socket: runserver_stream's path for /stream/.

uvicorn parses the request; server/protocol.py then hands the connection to a
``SocketStream``, which is the broker's sink for that client. From then on
an event costs one ``transport.write`` of bytes shared by every client, and
an idle stream costs this object, the broker's cursor and the transport:
no ASGI cycle, no coroutine, no task, no timer (a stream opened with a
token has one: the hub ends it when the token expires).
"""

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from ..web.app import OpenedMany, Reply, StreamingApp, access_expired, reply_headers

if TYPE_CHECKING:
    from ..fanout.hub import Hub, Subscriber
    from ..fanout.mux import Mux

logger = logging.getLogger(__name__)

# The body ends when the connection closes (no chunked framing), so every
# client's bytes are exactly the shared event bytes.
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\n"  # nginx: do not buffer the stream
    b"connection: close\r\n"
    b"\r\n"
)


def reset(transport: asyncio.Transport) -> None:
    """Cut a connection off with a reset (RST), not a close: a close would keep
    whatever the client never read in the kernel's buffers, megabytes per
    stalled client, until the client goes away."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    transport.abort()


LINGER_ZERO = struct.pack("ii", 1, 0)


def stream_head(headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """The stream's response head; ``headers``: more of them (CORS), rarely any."""
    if not headers:
        return STREAM_HEAD
    return STREAM_HEAD[:-2] + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"


def encode_reply(reply: Reply, *, head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}".encode(),
        *(name + b": " + value for name, value in reply_headers(reply)),
        b"connection: close",
    ]
    body = b"" if head_only else reply.body.encode()
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class SocketStream(asyncio.Protocol):
    """One stream's connection after its request was read; a broker Sink."""

    __slots__ = (
        "_app",
        "_broker",
        "_closer",
        "_drained",
        "_opening",
        "_release",
        "mux",
        "on_close",
        "paused",
        "subscriber",
        "transport",
    )

    def __init__(
        self, transport: asyncio.Transport, app: StreamingApp, *, on_close: Callable[[], None] | None = None
    ):
        self.transport = transport
        self.paused = False
        self.subscriber: Subscriber | None = None
        self.mux: Mux | None = None  # a multiplexed stream's tasks (instead of one subscriber)
        self.on_close = on_close  # the server's count of open connections
        self._app = app
        self._broker: Hub | None = None
        self._closer: asyncio.TimerHandle | None = None
        # Who waits for the socket to drain: one subscriber, or several of a
        # multiplexed stream. A future each, so a waiter cut off by its timeout
        # cancels only its own, without a shared future behind asyncio.shield
        # (an extra future and callbacks per wait, on the fanout's hot path).
        self._drained: list[asyncio.Future[None]] = []
        self._opening: asyncio.Task[None] | None = None
        self._release: Callable[[], None] | None = None  # the stream's place under the limits

    def open(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        client: str | None = None,
    ) -> None:
        """Answer the request; ``client``: the peer's address."""
        self._opening = asyncio.get_running_loop().create_task(
            self._open(method, path, query_string, headers, client), name="streaming-open"
        )

    async def _open(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        client: str | None,
    ) -> None:
        try:
            opened = await self._app.open_stream(method, path, query_string, headers, client=client)
        except Exception:
            logger.exception("Opening the stream %s failed", path)
            opened = Reply(500, "Internal server error\n")
        finally:
            self._opening = None
        if isinstance(opened, Reply):
            if not self.transport.is_closing():
                self.transport.write(encode_reply(opened, head_only=method == "HEAD"))
                self.transport.close()
            return
        if self.transport.is_closing():
            opened.release()
            return  # the client left while we looked the task up
        self._release = opened.release
        self.transport.write(stream_head(opened.headers))
        assert self._app.node is not None  # open_stream() admitted it: the node runs (and is never unset)
        self._broker = self._app.node.hub
        if isinstance(opened, OpenedMany):
            self.mux = self._app.attach_many(opened, self)
            return
        key, after, expires_at = opened.key, opened.after, opened.expires_at
        if expires_at is None:
            self.subscriber = self._broker.attach(key, after, self)
        else:  # a token's stream ends when the token does (the hub's one timer for it)
            ends_in = expires_at - time.time()
            self.subscriber = self._broker.attach(
                key, after, self, ends_in=ends_in, last=access_expired(expires_at)
            )

    # -- asyncio.Protocol ----------------------------------------------------

    def data_received(self, data: bytes) -> None:
        pass  # a stream's client has nothing more to say

    # eof_received is asyncio's default: the client's FIN closes the stream.
    # That is how a client that leaves an idle stream is noticed at once; a
    # client that half-closes after its request (no SSE client does) loses it.

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release is not None:
            self._release()
            self._release = None
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        if self._closer is not None:
            self._closer.cancel()
        if self._opening is not None:
            self._opening.cancel()
        if self.subscriber is not None:
            assert self._broker is not None  # set together with the subscriber
            self._broker.detach(self.subscriber)
            self.subscriber = None
        if self.mux is not None:
            self.mux.close()
            self.mux = None
        self._wake_drain()

    # -- Sink ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        try:  # noqa: SIM105 - the hot path; try costs nothing, suppress() a call per write
            self.transport.write(data)
        except RuntimeError:
            pass  # uvloop: the socket closed under us; connection_lost follows

    async def drain(self) -> None:
        while self.paused and not self.transport.is_closing():
            waiter = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            await waiter

    def end(self) -> None:
        self.transport.close()  # after what is buffered has been sent...
        if self._closer is None:
            # ...unless the client stops reading: cut it off as a stalled stream is.
            assert self._broker is not None  # end() comes from the broker, after attach
            timeout = self._broker.send_timeout
            self._closer = asyncio.get_running_loop().call_later(timeout, reset, self.transport)

    def abort(self) -> None:
        reset(self.transport)

    def _wake_drain(self) -> None:
        if self._drained:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
