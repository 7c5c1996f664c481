"""Serve the ASGI app with uvicorn (uvloop + httptools), shutting streams down cleanly."""

import asyncio
import importlib
import logging
import multiprocessing
import os
import signal
import time
from urllib.parse import unquote

import httptools
import uvicorn
from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .http import ABORT_EXTENSION, StreamingApp
from .sse import SocketStream
from .worker import run_worker

logger = logging.getLogger(__name__)


class StreamingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request for a stream takes the socket over.

    uvicorn parses the request line and headers; for ``/stream/...`` the
    connection then leaves uvicorn (as its own WebSocket upgrade does) for a
    ``SocketStream`` that the broker writes to directly. Every other request,
    and a stream asked for behind a pipelined request, goes the ASGI way.
    """

    streaming_app: StreamingApp  # set by _config() on a subclass
    taken_over = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {ABORT_EXTENSION: self.transport.abort}

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

    def _take_over(self, url) -> None:
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


class StreamingServer(uvicorn.Server):
    """On SIGINT/SIGTERM, stop the node first so open streams end and uvicorn can exit."""

    def __init__(self, config, app: StreamingApp):
        super().__init__(config)
        self.streaming_app = app
        self._loop = None

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.streaming_app.shutdown()))
        super().handle_exit(sig, frame)


def load_app() -> StreamingApp:
    module_path, _, attr = settings.ASGI_APPLICATION.rpartition(".")
    app = getattr(importlib.import_module(module_path), attr)
    if not isinstance(app, StreamingApp):
        raise TypeError(
            f"ASGI_APPLICATION {settings.ASGI_APPLICATION} must be a streaming.http.StreamingApp "
            "(use streaming.asgi.get_asgi_application())"
        )
    return app


def _config(app, *, host, port, uds, log_level) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        uds=uds,
        loop="uvloop",
        # The protocol class carries the app: uvicorn may wrap the ASGI app
        # in middleware, and a taken-over stream needs the app itself.
        http=type("StreamingHttpProtocol", (StreamingHttpProtocol,), {"streaming_app": app}),
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )


def serve(*, host="127.0.0.1", port=8888, uds=None, log_level="info", workers=1) -> None:
    if workers > 1:
        return _serve_workers(workers, host=host, port=port, uds=uds, log_level=log_level)
    app = load_app()
    StreamingServer(_config(app, host=host, port=port, uds=uds, log_level=log_level), app).run()


def _serve_workers(workers: int, *, host, port, uds, log_level) -> None:
    """Bind once, run ``workers`` processes on the socket, restart any that dies."""
    config = _config(None, host=host, port=port, uds=uds, log_level=log_level)
    sock = config.bind_socket()
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start():
        process = context.Process(target=run_worker, args=(sock, log_level), daemon=False)
        process.start()
        return process

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        # SIGTERM whatever came: a Ctrl+C reaches the workers from the
        # terminal too, and a second SIGINT would make uvicorn force-quit.
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    processes = [start() for _ in range(workers)]
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for i, process in enumerate(processes):
            if not process.is_alive() and not stopping:
                logger.warning("Worker %s exited with %s; starting another", process.pid, process.exitcode)
                processes[i] = start()
        time.sleep(0.5)
    for process in processes:
        process.join(30)
    sock.close()
