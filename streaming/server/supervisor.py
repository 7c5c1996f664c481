"""runserver_stream --workers N: one socket, N worker processes, restarted if they die."""

import logging
import multiprocessing
import os
import signal
import time

from .serve import make_config
from .worker import run_worker

logger = logging.getLogger(__name__)


def serve_workers(workers: int, *, host, port, uds, log_level) -> None:
    """Bind once, run ``workers`` processes on the socket, restart any that dies."""
    config = make_config(None, host=host, port=port, uds=uds, log_level=log_level)
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
