"""Settings of the demo project, safe to copy.

Everything that differs between machines comes from the environment:
DJANGO_SECRET_KEY (else a random key made once and kept in .secret_key
beside manage.py, never a key written here), DJANGO_DEBUG=1 to turn DEBUG on
(off by default), DJANGO_ALLOWED_HOSTS (comma-separated; this machine's
loopback names by default), DATABASE_URL (an SQLite file beside manage.py
when unset). Streaming options live in the one STREAMING dict, taken here
from STREAMING_* variables (the end-to-end tests start servers with short
timings that way); a project of your own sets STREAMING however it likes.
"""

import os
import secrets
import sys
import time
from pathlib import Path

import dj_database_url

from streaming.conf import from_environ

BASE_DIR = Path(__file__).resolve().parent.parent


def _local_secret_key(path: Path) -> str:
    """A random key made on first use and kept (mode 0600) for the next runs:
    sessions survive restarts, and no key is ever committed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(100):  # another process may be writing it this instant
            if key := path.read_text().strip():
                return key
            time.sleep(0.02)
        raise
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or _local_secret_key(BASE_DIR / ".secret_key")
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "streaming",  # the library
    "demo",  # the seed's demo tasks (ExampleTask, ContinueTask) and create_task
]
# The test suite's own task models: under `manage.py test`, and in the server
# processes the tests and benchmarks start (they set STREAMING_TEST_APPS=1).
# otherapp holds a task model whose class name testapp has too (Report).
if sys.argv[1:2] == ["test"] or os.environ.get("STREAMING_TEST_APPS") == "1":
    INSTALLED_APPS += ["streaming.tests.testapp", "streaming.tests.otherapp"]
    # ... on purpose: no need to say so at every start.
    SILENCED_SYSTEM_CHECKS = ["streaming.I001"]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "config.asgi.application"
TEST_RUNNER = "streaming.tests.runner.StreamingTestRunner"
WSGI_APPLICATION = "config.wsgi.application"

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=600,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets `manage.py shell` and `create_task` write while the server
        # runs; IMMEDIATE transactions and a busy timeout make writers queue
        # instead of failing with "database is locked".
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    # A file, not Django's in-memory default: end-to-end tests start the
    # server as a separate process that must see the same test database.
    _db_file = Path(DATABASES["default"]["NAME"])
    DATABASES["default"]["TEST"] = {"NAME": str(_db_file.with_name(f"test_{_db_file.name}"))}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# The demo has no login page of its own: the dashboard (/streaming/) sends
# anonymous users to the admin's.
LOGIN_URL = "/admin/login/"


# Every STREAMING setting can be given as an environment variable
# (STREAMING_MAX_STREAMS=5000, STREAMING_CORS_ALLOWED_ORIGINS=https://a,https://b).
STREAMING = from_environ()

# Django's tasks framework (Django 6; the django-tasks backport on 5.2) on our
# servers: @task functions run there and stream their progress (README, "Using
# Django's tasks framework"). The queues are the ones the tests use.
TASKS = {
    "default": {
        "BACKEND": "streaming.taskbackend.StreamingTaskBackend",
        "QUEUES": ["default", "reports", "emails"],
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    # Quieter under `manage.py test`: the in-process runner tests start many nodes.
    "loggers": {
        "streaming": {
            "handlers": ["console"],
            "level": "CRITICAL" if sys.argv[1:2] == ["test"] else "INFO",
        },
        # The tasks framework logs each task's end (the backport logs a failed
        # one with logger.exception): quiet under `manage.py test` too.
        **{
            name: {"handlers": ["console"], "level": "CRITICAL" if sys.argv[1:2] == ["test"] else "INFO"}
            for name in ("django.tasks", "django_tasks")
        },
    },
}
