"""What deciding access costs per connection: StreamingApp.open_stream, in-process.

    .venv/bin/python bench/access_cost.py [--requests 2000]

Times open_stream (the one place both HTTP paths decide a stream request:
Host check, parse, access, the row lookup) for a finished task of a public
class, and of a protected class opened by a token, by a session (a user with
the model's view permission, and a superuser), and refused (anonymous).
SQLite, one fresh database of its own; nothing is streamed, and nothing of
this runs per event (the hub's per-event path is unchanged: bench/hub_cost.py).
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
WORK = Path(tempfile.gettempdir()) / "streaming-bench-access"


def setup() -> None:
    WORK.mkdir(exist_ok=True)
    for path in WORK.glob("access.sqlite3*"):
        path.unlink()
    os.environ["DATABASE_URL"] = f"sqlite:///{WORK / 'access.sqlite3'}"
    os.environ["STREAMING_TEST_APPS"] = "1"
    os.environ.pop("STREAMING_BROKER_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


async def measure(requests: int) -> None:
    from asgiref.sync import sync_to_async
    from django.conf import settings
    from django.contrib.auth.models import Permission, User
    from django.test import Client

    from streaming.conf import get_settings
    from streaming.tests.testapp.models import PrivateTask, ScriptedTask
    from streaming.web.app import Opened, StreamingApp

    def prepare():
        public = ScriptedTask.objects.create(status="completed")
        private = PrivateTask.objects.create(status="completed")
        viewer = User.objects.create_user("viewer", password="pw")
        viewer.user_permissions.add(Permission.objects.get(codename="view_privatetask"))
        root = User.objects.create_superuser("root", password="pw")
        cookies = {}
        for user in (viewer, root):
            client = Client()
            client.force_login(user)
            cookies[user.username] = client.cookies[settings.SESSION_COOKIE_NAME].value
        return public, private, cookies

    public, private, cookies = await sync_to_async(prepare)()
    app = StreamingApp()
    # open_stream asks whether a node runs, and for its settings (CORS, limits)
    app.node = SimpleNamespace(settings=get_settings())  # type: ignore[assignment]
    host = [(b"host", b"127.0.0.1:8888")]
    token = private.stream_token(expires_in=3600)
    cases = {
        "public class": (public.get_stream_path(), b"", host, Opened),
        "token (?token=)": (private.get_stream_path(), f"token={token}".encode(), host, Opened),
        "token (Bearer)": (
            private.get_stream_path(),
            b"",
            [*host, (b"authorization", f"Bearer {token}".encode())],
            Opened,
        ),
        "session, view permission": (
            private.get_stream_path(),
            b"",
            [*host, (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookies['viewer']}".encode())],
            Opened,
        ),
        "session, superuser": (
            private.get_stream_path(),
            b"",
            [*host, (b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookies['root']}".encode())],
            Opened,
        ),
        "anonymous, refused (403)": (private.get_stream_path(), b"", host, None),
    }
    print(f"open_stream, {requests} requests each, one at a time (median / mean per request):")
    for name, (path, query, headers, expected) in cases.items():
        result = await app.open_stream("GET", path, query, headers)  # warm up, and check the answer
        ok = isinstance(result, Opened) if expected else getattr(result, "status", None) == 403
        assert ok, (name, result)
        if isinstance(result, Opened):
            result.release()
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            result = await app.open_stream("GET", path, query, headers)
            times.append(time.perf_counter() - started)
            if isinstance(result, Opened):
                result.release()  # its place under the stream limits
        median, mean = statistics.median(times) * 1e6, statistics.fmean(times) * 1e6
        print(f"  {name:28s} {median:8.0f} us {mean:8.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    setup()
    asyncio.run(measure(args.requests))


if __name__ == "__main__":
    main()
