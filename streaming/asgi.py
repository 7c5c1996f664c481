"""The ASGI entry point, importable before Django is set up (as an asgi.py needs).

# yourproject/asgi.py
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "yourproject.settings")
from streaming.asgi import get_asgi_application
application = get_asgi_application()

With an ASGI app of your own (a Channels ``ProtocolTypeRouter``, an app
wrapped in middleware), pass it: ``get_asgi_application(app=your_app)``.
"""

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .web.app import StreamingApp

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[Any]]


def get_asgi_application(app: "ASGIApp | None" = None) -> "StreamingApp":
    """The project's ASGI app: streaming paths, /health, and ``app`` for all else.

    ``app`` defaults to Django's own ASGI handler (with the static files
    handler in DEBUG). The result may itself be wrapped in ASGI middleware:
    ``runserver_stream`` finds the streaming app inside it.
    """
    import django

    django.setup(set_prefix=False)
    from .web.app import StreamingApp

    if app is None:
        from django.conf import settings
        from django.core.handlers.asgi import ASGIHandler

        app = ASGIHandler()
        if settings.DEBUG and "django.contrib.staticfiles" in settings.INSTALLED_APPS:
            from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

            app = ASGIStaticFilesHandler(app)
    return StreamingApp(app)
