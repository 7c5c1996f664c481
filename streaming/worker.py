"""Entry point of a ``runserver_stream --workers N`` process.

Kept free of model imports: a spawned worker unpickles its target before
Django is set up, so the setup must come first, here.
"""


def run_worker(sock, log_level: str) -> None:
    import django

    django.setup()
    from .server import StreamingServer, _config, load_app

    app = load_app()
    config = _config(app, host=None, port=None, uds=None, log_level=log_level)
    StreamingServer(config, app).run(sockets=[sock])
