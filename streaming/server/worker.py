"""Entry points of the processes runserver_stream spawns (--workers N, --reload).

Kept free of model imports: a spawned process unpickles its target before
Django is set up, so the setup must come first, here.
"""

import socket


def run_worker(sock: socket.socket, log_level: str) -> None:
    """A --workers process: its supervisor forwards Ctrl+C as SIGTERM."""
    import django

    django.setup()
    from .serve import serve

    serve(host=None, port=None, uds=None, log_level=log_level, sockets=[sock], worker=True)


def run_reloaded(sockets: list[socket.socket], *, log_level: str) -> None:
    """A --reload server process (uvicorn's reloader calls it ``target(sockets=...)``)."""
    import django

    django.setup()
    from .serve import serve

    serve(host=None, port=None, uds=None, log_level=log_level, sockets=sockets, reloading=True)
