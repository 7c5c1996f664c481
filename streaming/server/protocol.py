"""uvicorn's httptools protocol, with a way out for stream requests (the socket takeover),
and the limits uvicorn leaves out on that path: a deadline and a size for each request
head, and a bound on this process's open connections."""

import asyncio
import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..conf import StreamingSettings
from ..web.app import ABORT_EXTENSION, StreamingApp
from ..web.limits import LOG_EVERY, RETRY_AFTER, RateLimitedLog
from .sockets import SocketStream, reset

if TYPE_CHECKING:
    from httptools.parser.url_parser import URL

logger = logging.getLogger(__name__)

# A request URL longer than this is answered 414 (whatever MAX_HEADER_BYTES is):
# 8 KiB is what nginx and Apache accept by default, so no URL that works behind
# them is refused here, and it keeps a URL (which uvicorn gathers by
# concatenation and Django copies several times) small.
MAX_URL_BYTES = 8 * 1024
# Connections past MAX_CONNECTIONS still read, for the probes only: at most
# this many at a time, each with this long to send its head.
PROBE_RESERVE = 16
PROBE_HEAD_SECONDS = 2.0
PROBE_PATHS = (b"/health", b"/ready")
# After a 408, 414 or 431 the server stops sending (FIN) but reads, and drops,
# what the client still sends, for at most this long and this many bytes:
# closing with unread bytes would send a reset, which can destroy the answer
# before the client reads it. A client that sends on past either is reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


class ServerLimits:
    """One server process's limits (read once, in make_config) and its count of open connections.

    ``open`` counts every connection this process accepted and has not seen
    closed: heads still arriving, Django requests, idle keep-alive, and streams
    taken over by a SocketStream (which calls ``release`` when it closes).
    """

    def __init__(self, *, max_connections: int, header_timeout: float, max_header_bytes: int) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.open = 0
        self.accepted = 0  # connections taken in since start, probe-only ones included
        self.probing = 0  # connections past the limit, for /health and /ready (PROBE_RESERVE)
        self.release = self._release  # bound once: every taken-over stream's on_close
        self.refused = RateLimitedLog(
            logging.WARNING,
            f"Refused %d connection(s) with 503: this process is at its connection limit "
            f"({max_connections} open; MAX_CONNECTIONS). Logged at most every {LOG_EVERY:g} s.",
        )
        self.timed_out = RateLimitedLog(
            logging.INFO,
            f"Closed %d connection(s) whose request head did not arrive within {header_timeout:g} s "
            f"(idle or too slow clients; HEADER_TIMEOUT). Logged at most every {LOG_EVERY:g} s.",
        )
        self.oversized = RateLimitedLog(
            logging.WARNING,
            f"Refused %d request(s) with a head over {max_header_bytes} bytes (431; MAX_HEADER_BYTES) "
            f"or a URL over {MAX_URL_BYTES} bytes (414). Logged at most every {LOG_EVERY:g} s.",
        )

    @classmethod
    def from_settings(cls, settings: StreamingSettings) -> "ServerLimits":
        """The limits for this process. The open-files limit is raised to its maximum
        first; with MAX_CONNECTIONS None, connections may use all of it but a reserve
        for the database, Redis and files."""
        files = raise_open_files_limit()
        room = None if files is None else max(1, files - max(64, files // 10))
        if settings.MAX_CONNECTIONS is not None:
            max_connections, source = settings.MAX_CONNECTIONS, "MAX_CONNECTIONS"
            if room is not None and max_connections > room:
                logger.warning(
                    "MAX_CONNECTIONS=%d is more than this process's open-files limit (%d) leaves for "
                    "connections (%d): past that, accepting fails and nothing answers. Raise the limit "
                    "(ulimit -n, LimitNOFILE=) or lower MAX_CONNECTIONS.",
                    max_connections,
                    files,
                    room,
                )
        elif files is None or room is None:
            max_connections, source = 2**31 - 1, "no open-files limit known"
        else:
            max_connections = room
            source = f"the open-files limit {files} less {files - room} for the database, Redis and files"
        limits = cls(
            max_connections=max_connections,
            header_timeout=settings.HEADER_TIMEOUT,
            max_header_bytes=settings.MAX_HEADER_BYTES,
        )
        logger.info(
            "Connections: at most %d open in this process (%s); a request head must arrive "
            "within %g s and fit in %d bytes",
            max_connections,
            source,
            settings.HEADER_TIMEOUT,
            settings.MAX_HEADER_BYTES,
        )
        return limits

    def flush_logs(self) -> None:
        """Log the refusals and timeouts counted since their last lines (the server stops)."""
        for log in (self.refused, self.timed_out, self.oversized):
            log.flush()

    def _release(self) -> None:
        self.open -= 1


def raise_open_files_limit() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (Linux, macOS; failure
    ignored); the soft limit then in force, or None where there is none to read."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an unlimited hard limit but refuses a soft one over its
    # per-process maximum (OPEN_MAX, 10240, by default): try smaller ones.
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16, 10240]
    for target in targets:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
        except (ValueError, OSError):
            continue
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


class HeadRefused(Exception):
    """Raised in a parser callback to stop the parser; the answer is in ``_refusal``."""


class StreamingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request for a stream takes the socket over.

    uvicorn parses the request line and headers; for ``/stream/...`` the
    connection then leaves uvicorn (as its own WebSocket upgrade does) for a
    ``SocketStream`` that the broker writes to directly. Every other request,
    and a stream asked for behind a pipelined request, goes the ASGI way.

    Each request head must arrive within HEADER_TIMEOUT (from the connection,
    then from the first byte of each later request on it) and fit in
    MAX_HEADER_BYTES: one ``call_later`` handle per connection while a head
    is pending, none once it is in (so none on a stream). Connections past
    MAX_CONNECTIONS get a 503 at once.
    """

    streaming_app: StreamingApp  # set by make_config() on a subclass
    limits: ServerLimits  # likewise: one per server (process)
    taken_over = False  # the connection left for a SocketStream or a WebSocket protocol
    refused = False  # answered 503 as it came: never counted, never set up
    probe_only = False  # came in at the connection limit: /health and /ready only
    lingering = False  # answered 408/414/431: reading and dropping until it closes
    _head_timer: asyncio.TimerHandle | None = None  # a head pending (or the linger's end)
    _head_began = False  # a byte of the pending head arrived
    _head_bytes = 0  # of the pending head, as fed to the parser
    _refusal: tuple[int, str] | None = None  # set with HeadRefused

    # -- the connection ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        limits = self.limits
        if limits.open >= limits.max_connections and limits.probing < PROBE_RESERVE:
            # At the limit (a flood, an attack), probes still get their answer,
            # so an orchestrator does not restart a server that is only busy:
            # a few more connections, for /health and /ready only, with a short
            # head timeout.
            limits.probing += 1
            limits.accepted += 1
            self.probe_only = True
            super().connection_made(transport)
            timeout = min(limits.header_timeout, PROBE_HEAD_SECONDS)
            self._head_timer = self.loop.call_later(timeout, self._head_timed_out)
            return
        if limits.open >= limits.max_connections:
            self.refused = True
            self.transport = transport
            message = f"Server at its connection limit ({limits.max_connections}); retry later\n"
            transport.write(self._answer(503, message, b"retry-after: %d\r\n" % RETRY_AFTER))
            transport.close()
            limits.refused.add()
            return
        limits.open += 1
        limits.accepted += 1
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.refused:
            return
        if self.probe_only:
            self.limits.probing -= 1
        elif not self.taken_over:  # a SocketStream's connection_lost releases its own
            self.limits.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._head_bytes += len(data)
            if self._head_bytes > LINGER_BYTES:
                self.transport.abort()
            return
        pending = self._head_timer
        if pending is None:  # a body, or bytes between requests: as uvicorn does
            self._feed(data)
            return
        self._head_began = True
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            self._feed(data)
            return
        # Only the head's end may come within the room left: the parser gets no more of it.
        self._head_bytes += room
        if room > 0 and not self._feed(data[:room]):
            return
        if self._head_timer is pending:  # the same head goes on past the limit
            self._refuse(431, f"Request line and headers over {self.limits.max_header_bytes} bytes\n")
            self.limits.oversized.add()
        elif not (self.lingering or self.taken_over or self.transport.is_closing()):
            self._feed(data[room:])  # the head ended within the limit: the rest as uvicorn does

    def _feed(self, data: bytes) -> bool:
        """uvicorn's data_received; whether the parser may go on."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.taken_over:
                pass  # bytes pipelined after a stream request: the stream owns the socket now
            elif self._refusal is not None:
                self._refuse(*self._refusal)
                self.limits.oversized.add()
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    def handle_websocket_upgrade(self) -> None:
        if self.probe_only:  # past the connection limit only probes are served
            self._refuse_at_limit()
            return
        super().handle_websocket_upgrade()
        protocol = self.transport.get_protocol()
        if protocol is self:
            return
        # The connection now belongs to uvicorn's WebSocket protocol: it is
        # released when that one's connection is lost.
        self.taken_over = True
        lost = protocol.connection_lost
        release = self.limits.release

        def connection_lost(exc: Exception | None) -> None:
            release()
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]

    # -- request heads -----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # uvicorn types an extension's value as a dict (the ASGI spec's shape); this
        # one is the abort callable itself, which web/app.py calls.
        self.scope["extensions"] = {ABORT_EXTENSION: partial(reset, self.transport)}  # type: ignore[dict-item]
        if self.taken_over:
            return  # bytes pipelined after a stream request: ignored
        self._head_began = True
        if self._head_timer is None:  # a later request on a keep-alive connection
            self._head_bytes = 0  # the bytes of this read before the request began are not counted
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        if self.taken_over:
            return  # bytes pipelined after a stream request: ignored
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refusal = (414, f"Request URL over {MAX_URL_BYTES} bytes\n")
            raise HeadRefused

    def on_headers_complete(self) -> None:
        if self.taken_over:
            return  # bytes pipelined after a stream request: ignored
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_began = False
        url = httptools.parse_url(self.url)
        if self.probe_only and (url.path not in PROBE_PATHS or self.parser.should_upgrade()):
            self._refuse_at_limit()
            return
        if (
            url.path.startswith(b"/stream/")
            and not (self.parser.should_upgrade() and self._should_upgrade())  # a WebSocket: uvicorn's
            and (self.cycle is None or self.cycle.response_complete)
            and self.streaming_app.node is not None
        ):
            self._take_over(url)
        else:
            super().on_headers_complete()

    def _refuse_at_limit(self) -> None:
        """A probe-only connection asked for something else: 503, and nothing more of it is read."""
        limits = self.limits
        message = f"Server at its connection limit ({limits.max_connections}); retry later\n"
        self.transport.write(self._answer(503, message, b"retry-after: %d\r\n" % RETRY_AFTER))
        self.transport.close()
        self.taken_over = True  # nothing more of this connection is parsed or answered
        limits.refused.add()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.lingering:  # the linger's end
            self.transport.abort()
            return
        if self.transport.is_closing():
            return
        self.limits.timed_out.add()
        if not self._head_began:
            self.transport.close()  # nothing of a request came: nothing to answer
        else:
            self._refuse(408, f"The request head did not arrive within {self.limits.header_timeout:g} s\n")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (the head is not read further), then close, lingering."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.abort()  # a pipelined request's: the answer cannot go before the response
            return
        self.transport.write(self._answer(status, message))
        self.lingering = True
        self._head_bytes = 0
        with contextlib.suppress(NotImplementedError, RuntimeError, OSError):
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self._head_timer = self.loop.call_later(LINGER_SECONDS, self._head_timed_out)
                return
        self.transport.close()

    def _answer(self, status: int, message: str, headers: bytes = b"") -> bytes:
        body = message.encode("ascii")
        defaults = self.server_state.default_headers  # date, server
        default = b"".join(name + b": " + value + b"\r\n" for name, value in defaults)
        return b"".join(
            [
                STATUS_LINE[status],
                default,
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(body),
                headers,
                b"connection: close\r\n\r\n",
                body,
            ]
        )

    # -- the takeover ------------------------------------------------------------

    def _take_over(self, url: "URL") -> None:
        self.taken_over = True
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        stream = SocketStream(self.transport, self.streaming_app, on_close=self.limits.release)
        self.transport.set_protocol(stream)
        path = url.path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        client = self.client[0] if self.client else None
        method = self.parser.get_method().decode("ascii")
        stream.open(method, path, url.query or b"", self.headers, client=client)

    def on_body(self, body: bytes) -> None:
        if not self.taken_over:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.taken_over:
            super().on_message_complete()
