"""uvicorn's httptools protocol, with a way out for stream requests (the socket takeover)."""

from typing import TYPE_CHECKING
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..web.app import ABORT_EXTENSION, StreamingApp
from .sockets import SocketStream

if TYPE_CHECKING:
    from httptools.parser.url_parser import URL


class StreamingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request for a stream takes the socket over.

    uvicorn parses the request line and headers; for ``/stream/...`` the
    connection then leaves uvicorn (as its own WebSocket upgrade does) for a
    ``SocketStream`` that the broker writes to directly. Every other request,
    and a stream asked for behind a pipelined request, goes the ASGI way.
    """

    streaming_app: StreamingApp  # set by make_config() on a subclass
    taken_over = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # uvicorn types an extension's value as a dict (the ASGI spec's shape); this
        # one is the abort callable itself, which web/app.py calls.
        self.scope["extensions"] = {ABORT_EXTENSION: self.transport.abort}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        if self.taken_over:
            return  # bytes pipelined after a stream request: ignored
        url = httptools.parse_url(self.url)
        if (
            url.path.startswith(b"/stream/")
            and not (self.parser.should_upgrade() and self._should_upgrade())  # a WebSocket: uvicorn's
            and (self.cycle is None or self.cycle.response_complete)
            and self.streaming_app.node is not None
        ):
            self._take_over(url)
        else:
            super().on_headers_complete()

    def _take_over(self, url: "URL") -> None:
        self.taken_over = True
        self.connections.discard(self)
        self._unset_keepalive_if_required()
        stream = SocketStream(self.transport, self.streaming_app)
        self.transport.set_protocol(stream)
        path = url.path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        stream.open(self.parser.get_method().decode("ascii"), path, url.query or b"", self.headers)

    def on_body(self, body: bytes) -> None:
        if not self.taken_over:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.taken_over:
            super().on_message_complete()
