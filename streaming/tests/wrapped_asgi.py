"""A project's own ASGI set-up around the streaming app, for the tests of wrapped apps.

    ProtocolRouter({"http": TagResponses(get_asgi_application(app=ProtocolRouter({"http": own_app})))})

``ProtocolRouter`` refuses scope types it has no app for, the lifespan
among them, as Channels' ``ProtocolTypeRouter`` does; ``TagResponses`` is
an ASGI middleware (as Sentry's is); ``own_app`` is the project's own app,
which answers /own/ itself and hands the rest to Django.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application as django_asgi_app

from streaming.asgi import get_asgi_application

django_app = django_asgi_app()


class ProtocolRouter:
    def __init__(self, application_mapping):
        self.application_mapping = application_mapping

    async def __call__(self, scope, receive, send):
        if scope["type"] not in self.application_mapping:
            raise ValueError(f"No application configured for scope type {scope['type']!r}")
        return await self.application_mapping[scope["type"]](scope, receive, send)


class TagResponses:
    """Adds ``x-middleware: seen`` to every HTTP response that passes through it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-middleware", b"seen")]}
            await send(message)

        return await self.app(scope, receive, tagged)


async def own_app(scope, receive, send):
    if scope["path"].startswith("/own/"):
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": b"the project's own app"})
        return
    await django_app(scope, receive, send)


application = ProtocolRouter(
    {"http": TagResponses(get_asgi_application(app=ProtocolRouter({"http": own_app})))}
)
