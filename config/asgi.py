"""ASGI entry point: the streaming paths, and Django for everything else."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from streaming.asgi import get_asgi_application

application = get_asgi_application()
