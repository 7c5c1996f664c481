"""Serve the ASGI app with uvicorn (uvloop + httptools), shutting streams down cleanly."""

import asyncio
import importlib
import logging
import multiprocessing
import os
import signal
import time

import uvicorn
from django.conf import settings
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .http import ABORT_EXTENSION, StreamingApp
from .worker import run_worker

logger = logging.getLogger(__name__)


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


def _config(app, *, host, port, uds, log_level) -> uvicorn.Config:
    return uvicorn.Config(
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
