"""The demo project's settings with a closed ALLOWED_HOSTS, for the Host header tests (test_access.py)."""

from config.settings import *  # noqa: F403

ALLOWED_HOSTS = ["127.0.0.1", "stream.example.com"]
