"""Stream limits (per process, per client address, per task), client addresses
behind proxies, CORS settings, WebSocket upgrades to Django's paths, and the
memory a catch-up holds for a client that reads nothing."""

import asyncio
import gc
import socket

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.test import SimpleTestCase, TransactionTestCase, override_settings

from streaming.conf import from_environ, get_settings
from streaming.events import Event
from streaming.fanout.hub import Hub
from streaming.keys import TaskKey
from streaming.node import Node
from streaming.tasks import store
from streaming.tests.support import eventually, node_settings, serving
from streaming.tests.support import raw_request as request
from streaming.tests.testapp.models import ScriptedTask
from streaming.transports.base import History
from streaming.transports.local import LocalTransport
from streaming.web.cors import Cors
from streaming.web.limits import StreamLimits, client_address


def status(head: str) -> int:
    return int(head.split(" ", 2)[1])


class StreamLimitTests(TransactionTestCase):
    """Against the real server (the socket path): the limits answer 503 with
    Retry-After, count only open streams, and leave everyone else served."""

    async def test_most_streams_per_process(self):
        task = await ScriptedTask.objects.acreate(
            steps=1, status="created"
        )  # never started: streams stay open
        path = f"/stream/ScriptedTask/{task.pk}"
        async with serving(MAX_STREAMS=3) as (_app, port):
            opened = [await request(port, path) for _ in range(3)]
            self.assertEqual([status(head) for head, _r, _w in opened], [200, 200, 200])

            head, reader, writer = await request(port, path)
            body = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            self.assertEqual(status(head), 503, head)
            self.assertIn("retry-after: 5\r\n", head)
            self.assertIn(b"stream limit (3 open streams)", body)

            health_head, _r, health = await request(port, "/health")  # everyone else is served
            health.close()
            self.assertEqual(status(health_head), 200)

            opened.pop()[2].close()  # one leaves: its place is free again
            await asyncio.sleep(0)

            async def admitted() -> bool:
                head, _reader, writer = await request(port, path)
                if status(head) == 200:
                    opened.append((head, _reader, writer))
                    return True
                writer.close()
                return False

            await eventually(admitted, message="a stream admitted once another closed")
            for _head, _reader, writer in opened:
                writer.close()

    async def test_most_streams_per_client_address_behind_a_trusted_proxy(self):
        task = await ScriptedTask.objects.acreate(steps=1, status="created")
        path = f"/stream/ScriptedTask/{task.pk}"
        # Loopback is a trusted proxy by default: X-Forwarded-For names the client.
        async with serving(MAX_STREAMS_PER_CLIENT=2) as (_app, port):
            first = "x-forwarded-for: 203.0.113.7\r\n"
            kept = [await request(port, path, first) for _ in range(2)]
            self.assertEqual([status(head) for head, _r, _w in kept], [200, 200])
            head, reader, writer = await request(port, path, first)
            body = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            self.assertEqual(status(head), 503)
            self.assertIn(b"Too many streams from 203.0.113.7 (at most 2)", body)
            # The proxy's own hop does not count as the client: the nearest untrusted one does.
            head, _reader, other = await request(port, path, "x-forwarded-for: 203.0.113.8, 127.0.0.1\r\n")
            kept.append((head, _reader, other))
            self.assertEqual(status(head), 200, head)
            for _head, _reader, writer in kept:
                writer.close()

    async def test_an_untrusted_peer_cannot_pick_its_address(self):
        task = await ScriptedTask.objects.acreate(steps=1, status="created")
        path = f"/stream/ScriptedTask/{task.pk}"
        async with serving(MAX_STREAMS_PER_CLIENT=1, TRUSTED_PROXIES=("10.0.0.0/8",)) as (_app, port):
            head, _reader, kept = await request(port, path, "x-forwarded-for: 198.51.100.1\r\n")
            self.assertEqual(status(head), 200)
            # Another X-Forwarded-For from the same untrusted peer: still the peer, still over.
            head, reader, writer = await request(port, path, "x-forwarded-for: 198.51.100.2\r\n")
            body = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            kept.close()
            self.assertEqual(status(head), 503)
            self.assertIn(b"Too many streams from 127.0.0.1", body)

    async def test_most_streams_per_task(self):
        busy = await ScriptedTask.objects.acreate(steps=1, status="created")
        other = await ScriptedTask.objects.acreate(steps=1, status="created")
        async with serving(MAX_STREAMS_PER_TASK=2) as (_app, port):
            kept = [await request(port, f"/stream/ScriptedTask/{busy.pk}") for _ in range(2)]
            head, reader, writer = await request(port, f"/stream/ScriptedTask/{busy.pk}")
            body = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            self.assertEqual(status(head), 503)
            self.assertIn(b"Too many streams of this task (at most 2)", body)
            head, _reader, writer = await request(port, f"/stream/ScriptedTask/{other.pk}")
            kept.append((head, _reader, writer))
            self.assertEqual(status(head), 200)
            for _head, _reader, writer in kept:
                writer.close()

    async def test_refusals_that_are_not_streams_take_no_place(self):
        task = await ScriptedTask.objects.acreate(steps=1, status="created")
        async with serving(MAX_STREAMS=1) as (app, port):
            for path in (
                "/stream/ScriptedTask/999999",
                "/stream/Nope/1",
                f"/stream/ScriptedTask/{task.pk}?history=x",
            ):
                head, _reader, writer = await request(port, path)
                writer.close()
                self.assertIn(status(head), (400, 404), (path, head))
            head, _reader, writer = await request(port, f"/stream/ScriptedTask/{task.pk}")
            self.assertEqual(status(head), 200)
            writer.close()
            await eventually(lambda: app._guards[1].open == 0, message="the stream's place released")


class WebSocketToDjangoTests(TransactionTestCase):
    async def test_an_upgrade_to_a_django_path_is_refused_not_a_500(self):
        upgrade = (
            "connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )
        async with serving(ASGIHandler(), log_level="critical") as (_app, port):
            head, _reader, writer = await request(port, "/admin/", upgrade)
            writer.close()
            self.assertTrue(head.startswith("HTTP/1.1 403 Forbidden\r\n"), head)
            head, _reader, writer = await request(port, "/admin/login/")  # Django still serves it over HTTP
            writer.close()
            self.assertEqual(status(head), 200, head)


class StreamLimitsUnitTests(SimpleTestCase):
    def test_release_frees_each_count_once(self):
        limits = StreamLimits(node_settings(MAX_STREAMS=2, MAX_STREAMS_PER_CLIENT=1, MAX_STREAMS_PER_TASK=5))
        key = TaskKey("testapp.scriptedtask", 1)
        release = limits.admit(key, "a")
        self.assertTrue(callable(release))
        self.assertIsInstance(limits.admit(key, "a"), str)  # per client
        other = limits.admit(key, "b")
        self.assertIsInstance(limits.admit(key, "c"), str)  # per process
        release()
        release()  # a second call changes nothing
        self.assertEqual((limits.open, limits.per_client, limits.per_task), (1, {"b": 1}, {key: 1}))
        other()
        self.assertEqual((limits.open, limits.per_client, limits.per_task), (0, {}, {}))

    def test_client_address(self):
        trusted = ("127.0.0.1", "10.0.0.0/8")
        xff = {b"x-forwarded-for": b"203.0.113.1, 10.1.2.3"}
        self.assertEqual(client_address("127.0.0.1", xff, trusted), "203.0.113.1")
        self.assertEqual(client_address("192.0.2.9", xff, trusted), "192.0.2.9")  # not a proxy of ours
        self.assertEqual(client_address("127.0.0.1", {}, trusted), "127.0.0.1")
        self.assertEqual(client_address("127.0.0.1", {b"x-forwarded-for": b"10.0.0.1"}, trusted), "10.0.0.1")
        self.assertEqual(client_address("127.0.0.1", xff, ()), "127.0.0.1")
        # A hop that is not an address ends the walk at the last one vouched for.
        self.assertEqual(client_address("127.0.0.1", {b"x-forwarded-for": b"x" * 5000}, trusted), "127.0.0.1")
        spoofed = {b"x-forwarded-for": b"203.0.113.9, rotate-me-1, 10.0.0.1"}
        self.assertEqual(client_address("127.0.0.1", spoofed, trusted), "10.0.0.1")
        # A peer on an IPv6 socket bound to "::" shows IPv4 clients as IPv4-mapped addresses.
        self.assertEqual(client_address("::ffff:127.0.0.1", xff, trusted), "203.0.113.1")
        self.assertEqual(client_address("::ffff:192.0.2.9", xff, trusted), "192.0.2.9")
        self.assertEqual(client_address("127.0.0.1", xff, ["127.0.0.1"]), "10.1.2.3")  # a list works too

    def test_a_bad_trusted_proxy_is_a_configuration_error(self):
        with self.assertRaisesMessage(ImproperlyConfigured, "TRUSTED_PROXIES"):
            StreamLimits(node_settings(TRUSTED_PROXIES=("not-an-address",)))

    def test_lists_in_settings_are_taken_and_bad_limits_refused_at_start(self):
        with override_settings(
            STREAMING={"TRUSTED_PROXIES": ["10.0.0.0/8"], "CORS_ALLOWED_ORIGINS": ["https://a.b"]}
        ):
            settings = get_settings()
            self.assertEqual(settings.TRUSTED_PROXIES, ("10.0.0.0/8",))
            self.assertEqual(settings.CORS_ALLOWED_ORIGINS, ("https://a.b",))
            StreamLimits(settings)
            Cors(settings)
        for bad in ({"MAX_STREAMS": None}, {"MAX_STREAMS_PER_CLIENT": 0}):
            with (
                self.subTest(bad=bad),
                override_settings(STREAMING=bad),
                self.assertRaisesMessage(ImproperlyConfigured, "positive number"),
            ):
                get_settings()

    async def test_a_bad_cors_setting_fails_the_start_not_a_request(self):
        from streaming.web.app import StreamingApp

        app = StreamingApp(
            node_factory=lambda: Node(node_settings(CORS_ALLOWED_ORIGINS=("*",), CORS_ALLOW_CREDENTIALS=True))
        )
        with self.assertRaisesMessage(ImproperlyConfigured, "CORS_ALLOW_CREDENTIALS"):
            await app.start()
        self.assertIsNone(app.node)


class CorsSettingsTests(SimpleTestCase):
    def test_misconfigurations_are_refused_at_start(self):
        for origins, credentials, message in [
            (("*",), True, "cannot be used with"),
            (("https://a.example/path",), False, "is not an origin"),
            (("a.example",), False, "is not an origin"),
            ("https://a.example", False, "not a string"),
        ]:
            with self.subTest(origins=origins), self.assertRaisesMessage(ImproperlyConfigured, message):
                Cors(node_settings(CORS_ALLOWED_ORIGINS=origins, CORS_ALLOW_CREDENTIALS=credentials))

    def test_same_origin_allowed_and_refused(self):
        cors = Cors(node_settings(CORS_ALLOWED_ORIGINS=("https://app.example",)))
        self.assertIsNone(cors.check(b"http://127.0.0.1:8888", b"127.0.0.1:8888"))
        self.assertIsNone(cors.check(b"https://api.example", b"api.example"))  # default port
        self.assertIsInstance(cors.check(b"https://api.example", b"api.example:8443"), str)
        self.assertIsInstance(cors.check(b"null", b"api.example"), str)
        allowed = cors.check(b"https://App.example", b"api.example")
        self.assertEqual(
            allowed.headers,
            ((b"access-control-allow-origin", b"https://App.example"), (b"vary", b"Origin")),
        )
        self.assertFalse(allowed.credentials)
        self.assertIn("https://evil.example may not read streams", cors.check(b"https://evil.example", b"x"))

    def test_settings_from_the_environment(self):
        values = from_environ(
            environ={
                "STREAMING_CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example",
                "STREAMING_CORS_ALLOW_CREDENTIALS": "yes",
                "STREAMING_MAX_STREAMS_PER_TASK": "none",
                "STREAMING_HEADER_TIMEOUT": "2.5",
                "STREAMING_MAX_STREAMS": "",  # empty: not given
            }
        )
        self.assertEqual(
            values,
            {
                "CORS_ALLOWED_ORIGINS": ("https://a.example", "https://b.example"),
                "CORS_ALLOW_CREDENTIALS": True,
                "MAX_STREAMS_PER_TASK": None,
                "HEADER_TIMEOUT": 2.5,
            },
        )
        with self.assertRaisesMessage(ImproperlyConfigured, "STREAMING_MAX_STREAMS='many'"):
            from_environ(environ={"STREAMING_MAX_STREAMS": "many"})


class CatchUpMemoryTests(SimpleTestCase):
    async def test_a_client_that_reads_nothing_holds_one_chunk_not_a_log_batch(self):
        newest = 100_000
        reads = []

        class LongHistory(History):
            async def read(self, key, after, limit):
                reads.append(after)
                last = min(after + limit, newest)
                return [
                    Event(seq, "progress", f'{{"n": {seq}, "pad": "{"x" * 200}"}}')
                    for seq in range(after + 1, last + 1)
                ]

            async def last(self, key):
                return Event(newest, "complete", "{}")

        class StuckSink:
            paused = False
            written = 0

            def write(self, data):
                self.written += 1
                self.paused = True  # its socket never drains

            async def drain(self):
                await asyncio.Event().wait()

            def end(self):
                pass

            abort = end

        settings = node_settings(HISTORY_SIZE=1000, MAX_CHUNK_BYTES=16 * 1024)
        hub = Hub(transport=LocalTransport(), history=LongHistory(), settings=settings)
        sink = StuckSink()
        sub = hub.attach(TaskKey("testapp.scriptedtask", 1), 0, sink)
        await eventually(lambda: sink.written == 1, message="the first chunk written")
        await asyncio.sleep(0)
        gc.collect()
        # Memory holds the latest HISTORY_SIZE events (the seed, shared by every
        # client); of the older ones read for this client, none is held while it waits.
        self.assertEqual(reads[-1], 0)  # it did read the log from the start
        held = [obj for obj in gc.get_objects() if isinstance(obj, Event) and obj.seq <= newest - 1000]
        self.assertEqual(len(held), 0)
        hub.detach(sub)
        await hub.stop()


class StalledClientResetTests(TransactionTestCase):
    async def test_a_client_that_reads_nothing_is_reset_not_closed(self):
        """A close would leave what it never read in the kernel's buffers until it
        goes away (megabytes per client); a reset frees them at once."""
        task = await ScriptedTask.objects.acreate(steps=1, status="completed")
        key = TaskKey.of(task)
        pad = "x" * 300
        events = [
            Event(seq, "step", f'{{"step": {seq}, "pad": "{pad}"}}') for seq in range(1, 10_001)
        ]  # 3 MB: more than the socket buffers hold
        await sync_to_async(store.write_events)([(key, event) for event in events])
        async with serving(CLIENT_SEND_TIMEOUT=0.5) as (app, port):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            await asyncio.get_running_loop().sock_sendall(
                sock, f"GET {task.get_stream_path()}?history=all HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode()
            )
            hub = app.node.hub
            await eventually(lambda: hub._channels.get(key) and hub._channels[key].subs, message="the stream")
            await eventually(
                lambda: key not in hub._channels, timeout=10, message="the stalled client cut off"
            )
            sock.setblocking(True)
            sock.settimeout(5)

            def read_to_the_end():
                while sock.recv(1 << 20):
                    pass

            # In a thread: the server runs in this loop, and its socket's close
            # is a callback the loop has yet to run.
            with self.assertRaises(ConnectionResetError):
                await asyncio.to_thread(read_to_the_end)
            sock.close()
