"""The demo project's settings, with the wrapped ASGI app of wrapped_asgi.py."""

from config.settings import *  # noqa: F403

ASGI_APPLICATION = "streaming.tests.wrapped_asgi.application"
