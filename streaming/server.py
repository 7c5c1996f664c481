"""Serve the ASGI app with uvicorn (uvloop + httptools), shutting streams down cleanly."""

import asyncio
import importlib

import uvicorn
from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .http import ABORT_EXTENSION, StreamingApp


class StreamingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a way for a stream to abort its socket."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {ABORT_EXTENSION: self.transport.abort}


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
            "(use streaming.http.get_asgi_application())"
        )
    return app


def serve(*, host="127.0.0.1", port=8888, uds=None, log_level="info") -> None:
    app = load_app()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        uds=uds,
        loop="uvloop",
        http=StreamingHttpProtocol,
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
    StreamingServer(config, app).run()
