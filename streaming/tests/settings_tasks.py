"""The demo project's settings, serving the README's tasks-framework example (tests/taskviews.py)."""

from config.settings import *  # noqa: F403

ROOT_URLCONF = "streaming.tests.taskviews"
