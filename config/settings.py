"""Settings of the demo project.

The database comes from DATABASE_URL (an SQLite file beside manage.py when
unset); streaming options live in the one STREAMING dict. The STREAMING_*
environment variables below exist so the end-to-end tests can start servers
with short timings; a project of your own sets STREAMING however it likes.
"""

import os
import sys
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-insecure-key-change-me")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"]

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
if sys.argv[1:2] == ["test"] or os.environ.get("STREAMING_TEST_APPS") == "1":
    INSTALLED_APPS.append("streaming.tests.testapp")

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


def _env_float(name):
    value = os.environ.get(name)
    return float(value) if value else None


def _env_bool(name):
    value = os.environ.get(name)
    return value.strip().lower() in ("1", "true", "yes", "on") if value else None


STREAMING = {
    key: value
    for key, value in {
        "BROKER_URL": os.environ.get("STREAMING_BROKER_URL") or None,
        "POLL_INTERVAL": _env_float("STREAMING_POLL_INTERVAL"),
        "LEASE_SECONDS": _env_float("STREAMING_LEASE_SECONDS"),
        "KEEPALIVE_INTERVAL": _env_float("STREAMING_KEEPALIVE_INTERVAL"),
        "CLIENT_SEND_TIMEOUT": _env_float("STREAMING_CLIENT_SEND_TIMEOUT"),
        "SHUTDOWN_GRACE": _env_float("STREAMING_SHUTDOWN_GRACE"),
        "RUN_TASKS": _env_bool("STREAMING_RUN_TASKS"),
    }.items()
    if value is not None
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
        }
    },
}
