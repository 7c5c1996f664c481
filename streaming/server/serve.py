"""Serve the ASGI app with uvicorn (uvloop + httptools), shutting streams down cleanly."""

import asyncio
import importlib
import logging
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ..conf import get_settings
from ..web.app import StreamingApp, built
from ..web.metrics import connection_counts
from .protocol import ServerLimits, StreamingHttpProtocol

logger = logging.getLogger(__name__)

STARTUP_FAILURE = 3  # uvicorn's exit code when the app fails to start
# Where ASGI middleware and routers keep the app they wrap (Channels' router: a mapping).
INNER_APP_ATTRIBUTES = ("app", "application", "asgi_app", "inner", "wrapped", "_app")


class StreamingServer(uvicorn.Server):
    """uvicorn, plus the node's life: started once the socket is bound (whether or
    not a lifespan reaches the app), stopped on SIGINT/SIGTERM before uvicorn exits.

    The first signal stops the node: it stops claiming, gives running tasks
    SHUTDOWN_GRACE seconds, hands the rest back and ends every stream; a
    second one ends the grace at once (``wait_for_tasks=False``: the first
    one does, as under --reload). ``ignore_sigint``: a --workers process,
    whose supervisor forwards the terminal's Ctrl+C as SIGTERM.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        app: StreamingApp,
        *,
        wait_for_tasks: bool = True,
        ignore_sigint: bool = False,
    ) -> None:
        super().__init__(config)
        self.streaming_app = app
        self.wait_for_tasks = wait_for_tasks
        self.ignore_sigint = ignore_sigint
        self.failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Task | None = None
        self._signals = 0  # counted in the signal handler itself, before the loop runs anything

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan (it may start the node), then the bind
        if self.started and not self.should_exit:
            try:
                await self.streaming_app.start()  # idempotent; middleware may not pass the lifespan on
            except Exception:
                self.failed = self.should_exit = True  # logged by the app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._stop_node()
        limits = getattr(self.config.http, "limits", None)  # our protocol's (make_config)
        if isinstance(limits, ServerLimits):
            limits.flush_logs()
        await super().shutdown(sockets)
        await self.streaming_app.shutdown()  # the stop begun above: done before uvicorn re-raises the signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and self.ignore_sigint:
            return
        if self._loop is not None:
            if not self._signals:
                self._loop.call_soon_threadsafe(self._stop_node)
            if self._signals or not self.wait_for_tasks:
                self._loop.call_soon_threadsafe(self.streaming_app.hurry)
            self._signals += 1
        super().handle_exit(sig, frame)

    def _stop_node(self) -> None:
        """Begin the node's stop at once: uvicorn waits for open connections
        (streams on the ASGI path among them) before its lifespan shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self.streaming_app.shutdown())


def load_app() -> tuple[object, StreamingApp]:
    """The project's ASGI_APPLICATION, and the StreamingApp in it (itself, or one it wraps)."""
    module_path, _, attr = settings.ASGI_APPLICATION.rpartition(".")
    app = getattr(importlib.import_module(module_path), attr)
    streaming_app = find_streaming_app(app)
    if streaming_app is None:
        raise ImproperlyConfigured(
            f"ASGI_APPLICATION {settings.ASGI_APPLICATION} holds no streaming app: build it with "
            "streaming.asgi.get_asgi_application() (wrap that in middleware if you like, or pass "
            "your own ASGI app in: get_asgi_application(app=...))"
        )
    return app, streaming_app


def find_streaming_app(app: object, depth: int = 8) -> StreamingApp | None:
    """``app`` if it is a StreamingApp, else one it wraps (as middleware keeps it), else
    the only StreamingApp this process has built."""
    level, seen = [app], set()
    for _ in range(depth):
        inner: list[object] = []
        for obj in level:
            if isinstance(obj, StreamingApp):
                return obj
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            inner.extend(getattr(obj, name, None) for name in INNER_APP_ATTRIBUTES)
            mapping = getattr(obj, "application_mapping", None)  # Channels' ProtocolTypeRouter
            if isinstance(mapping, dict):
                inner.extend(mapping.values())
        level = [obj for obj in inner if obj is not None]
    candidates = list(built)
    return candidates[0] if len(candidates) == 1 else None


def make_config(
    app: Any,
    *,
    host: str | None,
    port: int | None,
    uds: str | None,
    log_level: str,
    streaming_app: StreamingApp | None = None,
    **options: Any,
) -> uvicorn.Config:
    """uvicorn's config; ``streaming_app``: the StreamingApp inside ``app`` when ``app`` wraps it.

    Called once in each server process: the protocol class it builds carries
    that server's limits (HEADER_TIMEOUT, MAX_HEADER_BYTES, MAX_CONNECTIONS,
    read here) and its count of open connections. (A --workers supervisor
    calls it without an app, only to bind the socket: no limits then.)
    """
    streaming_app = streaming_app or app
    protocol: type[StreamingHttpProtocol] | None = None
    if streaming_app is not None:
        limits = ServerLimits.from_settings(get_settings())
        connection_counts[streaming_app] = limits  # for /metrics
        attributes = {"streaming_app": streaming_app, "limits": limits}
        protocol = type("StreamingHttpProtocol", (StreamingHttpProtocol,), attributes)
    return uvicorn.Config(
        app,
        host=host or "127.0.0.1",  # unused when serving on given sockets (a worker)
        port=port or 0,
        uds=uds,
        loop="uvloop",
        # The protocol class carries the app: uvicorn may wrap the ASGI app
        # in middleware, and a taken-over stream needs the app itself.
        http=protocol or "httptools",
        # A wrapping app (a Channels router) may refuse the lifespan; the
        # server starts the node itself anyway.
        lifespan="on" if app is streaming_app else "auto",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        **options,
    )


def serve(
    *,
    host: str | None = "127.0.0.1",
    port: int | None = 8888,
    uds: str | None = None,
    log_level: str = "info",
    sockets: list[socket.socket] | None = None,
    worker: bool = False,
    reloading: bool = False,
) -> None:
    """Serve the project's app in this process (on ``sockets`` when given: a worker)."""
    app, streaming_app = load_app()
    config = make_config(app, host=host, port=port, uds=uds, log_level=log_level, streaming_app=streaming_app)
    server = StreamingServer(config, streaming_app, wait_for_tasks=not reloading, ignore_sigint=worker)
    server.run(sockets=sockets)
    if server.failed:
        sys.exit(STARTUP_FAILURE)
