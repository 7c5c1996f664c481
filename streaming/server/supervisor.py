"""Process supervisors of runserver_stream: --workers N (one socket, N worker
processes, restarted if they die) and --reload (a server process, restarted
when code changes)."""

import contextlib
import functools
import importlib.util
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn
from django.conf import settings
from uvicorn.supervisors import ChangeReload

from ..conf import get_settings
from ..web.metrics import MULTIPROCESS_DIR
from .serve import make_config
from .worker import run_reloaded, run_worker

logger = logging.getLogger(__name__)


def serve_workers(workers: int, *, host: str, port: int, uds: str | None, log_level: str) -> None:
    """Bind once, run ``workers`` processes on the socket, restart any that dies."""
    with shared_metrics_dir() as metrics_dir:
        _serve_workers(workers, host=host, port=port, uds=uds, log_level=log_level, metrics_dir=metrics_dir)


@contextlib.contextmanager
def shared_metrics_dir() -> Iterator[str | None]:
    """With METRICS on, the directory where the workers' metrics meet
    (PROMETHEUS_MULTIPROC_DIR, read by prometheus-client in each worker): a
    temporary one, removed at the end, unless the environment names one."""
    if not get_settings().METRICS:
        yield None
        return
    given = os.environ.get(MULTIPROCESS_DIR)
    if given:
        yield given
        return
    path = tempfile.mkdtemp(prefix="streaming-metrics-")
    os.environ[MULTIPROCESS_DIR] = path  # the spawned workers inherit it
    logger.info("Metrics: the workers' figures meet in %s (removed at exit)", path)
    try:
        yield path
    finally:
        del os.environ[MULTIPROCESS_DIR]
        shutil.rmtree(path, ignore_errors=True)


def _forget_worker(metrics_dir: str | None, pid: int | None) -> None:
    """A dead worker's gauges (its open streams, ...) no longer count."""
    if metrics_dir is None or pid is None:
        return
    try:
        from prometheus_client.multiprocess import mark_process_dead
    except ImportError:
        return
    mark_process_dead(pid, metrics_dir)


def _serve_workers(
    workers: int, *, host: str, port: int, uds: str | None, log_level: str, metrics_dir: str | None
) -> None:
    config = make_config(None, host=host, port=port, uds=uds, log_level=log_level)
    sock = config.bind_socket()
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> "multiprocessing.context.SpawnProcess":
        process = context.Process(target=run_worker, args=(sock, log_level), daemon=False)
        process.start()
        return process

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        # SIGTERM whatever came (the workers ignore the terminal's Ctrl+C):
        # the first ends them gracefully, a second ends their grace at once.
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]  # alive, so it has a pid

    processes = [start() for _ in range(workers)]
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for i, process in enumerate(processes):
            if not process.is_alive() and not stopping:
                logger.warning("Worker %s exited with %s; starting another", process.pid, process.exitcode)
                _forget_worker(metrics_dir, process.pid)
                processes[i] = start()
        time.sleep(0.5)
    for process in processes:
        process.join(get_settings().SHUTDOWN_GRACE + 30)
    sock.close()


def serve_reloading(
    *, host: str, port: int, uds: str | None, log_level: str, reload_dirs: list[str] | None = None
) -> None:
    """runserver_stream --reload: a server process, restarted when a watched ``*.py`` changes.

    uvicorn's reloader binds the socket once and runs each server in a fresh
    process (``worker.run_reloaded``): the same socket takeover and node as
    without --reload. A restart does not wait for running tasks (they are
    interrupted by their recovery policy at once, as by a second Ctrl+C).
    """
    if importlib.util.find_spec("watchfiles") is None:
        logger.warning(
            "--reload without watchfiles rescans every .py file under the watched directories "
            "(a virtualenv inside them too) four times a second: "
            "pip install 'django-streaming-coordinator[reload]'"
        )
    module_path, _, attr = settings.ASGI_APPLICATION.rpartition(".")
    config = uvicorn.Config(
        f"{module_path}:{attr}",  # only what the reloader needs: each process loads the app itself
        host=host,
        port=port,
        uds=uds,
        log_level=log_level,
        reload=True,
        reload_dirs=reload_dirs or None,
    )
    sock = config.bind_socket()
    ChangeReload(config, target=functools.partial(run_reloaded, log_level=log_level), sockets=[sock]).run()
