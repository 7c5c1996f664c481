"""Serve the ASGI app with uvicorn (uvloop + httptools), shutting streams down cleanly."""

import asyncio
import importlib
import logging

import uvicorn
from django.conf import settings

from ..web.app import StreamingApp
from .protocol import StreamingHttpProtocol

logger = logging.getLogger(__name__)


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


def make_config(app, *, host, port, uds, log_level) -> uvicorn.Config:
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


def serve(*, host="127.0.0.1", port=8888, uds=None, log_level="info", sockets=None) -> None:
    """Serve the project's app in this process (on ``sockets`` when given: a worker)."""
    app = load_app()
    StreamingServer(make_config(app, host=host, port=port, uds=uds, log_level=log_level), app).run(
        sockets=sockets
    )
