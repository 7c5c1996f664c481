"""Entry point of a ``runserver_stream --workers N`` process.

Kept free of model imports: a spawned worker unpickles its target before
Django is set up, so the setup must come first, here.
"""

import socket


def run_worker(sock: socket.socket, log_level: str) -> None:
    import django

    django.setup()
    from .serve import serve

    serve(host=None, port=None, uds=None, log_level=log_level, sockets=[sock])
