"""Hostile and broken clients against a real runserver_stream: idle sockets and
slowloris (HEADER_TIMEOUT), oversized heads (MAX_HEADER_BYTES, 414), connection
floods (MAX_CONNECTIONS); the server answers them clearly and keeps serving."""

import contextlib
import os
import re
import selectors
import socket
import threading
import time
import unittest

import httpx
from django.test import TransactionTestCase

from streaming.conf import get_settings
from streaming.tests.testapp.models import ScriptedTask
from streaming.transports import is_shared

from .servercase import ServerTestCase
from .support import ServerProcess, read_stream, wait_for

TIMEOUT = 1.0  # HEADER_TIMEOUT of the servers here
SLACK = 1.5  # how late past a deadline a close may come on a busy machine
EARLY = 0.15  # how early (timers and clocks of two processes)


def connect(server, timeout=10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock, limit=1 << 20) -> tuple[bytes, bool]:
    """What the server sent before it closed, and whether it reset the connection."""
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                return data, False
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return data, True
    return data, False


def exchange(server, head: bytes) -> bytes:
    with connect(server) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(head)
        return read_until_closed(sock)[0]


def get_health(server) -> float:
    """Seconds /health took; fails unless it answered OK."""
    started = time.monotonic()
    response = httpx.get(f"{server.url}/health", timeout=5)
    assert response.text == "OK", response
    return time.monotonic() - started


def request(path: str, *headers: bytes) -> bytes:
    return b"\r\n".join([b"GET " + path.encode() + b" HTTP/1.1", b"host: 127.0.0.1", *headers, b"", b""])


def status_of(answer: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(match[1]) if match else None


def wait_closed(socks, *, dribble: bytes = b"", every: float = 0.3, timeout: float = 10.0):
    """Wait until the server has closed every socket (sending each the next byte of
    ``dribble`` every ``every`` s meanwhile); per socket: (seconds, what it got)."""
    started = time.monotonic()
    ended: dict[socket.socket, tuple[float, bytes]] = {}
    got = {sock: b"" for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        sent = 0
        while len(ended) < len(socks):
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{len(socks) - len(ended)} of {len(socks)} sockets still open")
            if dribble and sent < len(dribble):
                for sock in socks:
                    if sock not in ended:
                        with contextlib.suppress(BlockingIOError, ConnectionResetError, BrokenPipeError):
                            sock.send(dribble[sent : sent + 1])
                sent += 1
            turn_ends = time.monotonic() + every
            while len(ended) < len(socks) and (left := turn_ends - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    sock = key.fileobj
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        chunk = b""
                    got[sock] += chunk
                    if not chunk:
                        ended[sock] = (time.monotonic() - started, got[sock])
                        selector.unregister(sock)
    return ended


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


class HeadTests(ServerTestCase):
    """HEADER_TIMEOUT (1 s here) and MAX_HEADER_BYTES (its default, 64 KiB)."""

    server_settings = {"header_timeout": TIMEOUT}

    def test_connections_that_send_nothing_are_closed_after_the_header_timeout(self):
        socks = [connect(self.server) for _ in range(10)]
        try:
            ended = wait_closed(socks)
        finally:
            for sock in socks:
                sock.close()
        for seconds, got in ended.values():
            self.assertEqual(got, b"", "nothing of a request came: nothing to answer")
            self.assertGreaterEqual(seconds, TIMEOUT - EARLY)
            self.assertLess(seconds, TIMEOUT + SLACK)
        get_health(self.server)

    def test_slowloris_is_cut_off_while_health_and_streams_go_on(self):
        task = ScriptedTask.objects.create(steps=5, delay=0.5, status="created")  # 2.5 s: past the timeout
        events = []
        reader = threading.Thread(
            target=lambda: events.extend(
                read_stream(f"{self.server.url}{task.get_stream_path()}", headers={"Last-Event-ID": "0"})
            )
        )
        probes: list[float] = []
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                probes.append(get_health(self.server))
                stop.wait(0.1)

        prober = threading.Thread(target=probe)
        socks = [connect(self.server) for _ in range(200)]
        try:
            reader.start()
            prober.start()
            task.start()
            dribble = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 100
            ended = wait_closed(socks, dribble=dribble, every=0.3)
        finally:
            stop.set()
            for sock in socks:
                sock.close()
        prober.join(10)
        reader.join(30)
        for seconds, got in ended.values():
            self.assertIn(status_of(got), (408, None), got)
            self.assertGreaterEqual(seconds, TIMEOUT - EARLY)
            self.assertLess(seconds, TIMEOUT + SLACK)
        answered = [got for _, got in ended.values() if got]
        self.assertTrue(answered, "the slow heads are answered 408")
        self.assertIn(b"The request head did not arrive within 1 s\n", answered[0])
        self.assertIn(b"connection: close\r\n", answered[0])
        self.assertGreaterEqual(len(probes), 5)
        self.assertLess(max(probes), 0.5, f"/health probes: {probes}")
        # A stream outlives the header timeout: its timer ended with its head.
        self.assertEqual([e.id for e in events], [1, 2, 3, 4, 5, 6])
        self.assertEqual(events[-1].event, "complete")
        wait_for(lambda: "whose request head did not arrive within 1 s" in self.server.log())

    def test_a_keep_alive_request_whose_head_dribbles_gets_408(self):
        with connect(self.server) as sock:
            answer = self.first_response(sock)
            self.assertEqual(status_of(answer), 200)
            self.assertNotIn(b"connection: close", answer)
            second = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: aaaaaaaaaa"
            ended = wait_closed([sock], dribble=second)
        ((seconds, got),) = ended.values()
        self.assertEqual(status_of(got), 408, got)
        self.assertGreaterEqual(seconds, TIMEOUT - EARLY)
        self.assertLess(seconds, TIMEOUT + SLACK)

    def test_an_idle_keep_alive_connection_is_closed_by_uvicorns_own_timeout(self):
        # Between requests the head timer is off: uvicorn's timeout_keep_alive (5 s) applies.
        with connect(self.server) as sock:
            answer = self.first_response(sock)
            ended = wait_closed([sock])
        ((seconds, got),) = ended.values()
        self.assertEqual(got, b"")
        self.assertGreaterEqual(seconds, 5 - EARLY)
        self.assertLess(seconds, 5 + SLACK)
        self.assertEqual(status_of(answer), 200)

    def first_response(self, sock) -> bytes:
        sock.sendall(request("/health"))
        answer = b""
        while not answer.endswith(b"\r\n\r\nOK"):
            answer += sock.recv(65536)
        return answer

    def test_431_for_a_head_over_the_limit_on_every_kind_of_path(self):
        task = ScriptedTask.objects.create(steps=1, status="created")
        limit = get_settings().MAX_HEADER_BYTES
        for path in ("/health", task.get_stream_path(), "/admin/"):
            with self.subTest(path=path):
                answer = exchange(self.server, request(path, b"x-big: " + b"a" * 100_000))
                self.assertEqual(status_of(answer), 431, answer[:300])
                self.assertIn(b"connection: close\r\n", answer)
                self.assertTrue(answer.endswith(f"Request line and headers over {limit} bytes\n".encode()))
                get_health(self.server)
        # Just under the limit: served.
        answer = exchange(self.server, request("/health", b"connection: close", b"x-big: " + b"a" * 60_000))
        self.assertEqual(status_of(answer), 200, answer[:200])

    def test_414_for_a_url_over_8_kib(self):
        task = ScriptedTask.objects.create(steps=1, status="created")
        for path in ("/health", task.get_stream_path(), "/admin/"):
            with self.subTest(path=path):
                answer = exchange(self.server, request(path + "?q=" + "a" * 10_000))
                self.assertEqual(status_of(answer), 414, answer[:300])
                self.assertTrue(answer.endswith(b"Request URL over 8192 bytes\n"), answer[:300])
                get_health(self.server)

    def test_a_50_mb_header_is_cut_off_early_and_costs_no_memory(self):
        pid = self.server.proc.pid  # one process: the server itself
        before = rss_kb(pid)
        total = 50 * 1024 * 1024
        chunk = b"a" * 65536
        sent = 0
        with connect(self.server) as sock:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: ")
                while sent < total:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (ConnectionResetError, BrokenPipeError):
                pass
            answer, _ = read_until_closed(sock)
        # Cut off early: a reset while sending, or the 431 read after sending it all.
        self.assertTrue(sent < total or status_of(answer) == 431, (sent, answer[:100]))
        self.assertLess(sent, total // 4)
        grown_mb = (rss_kb(pid) - before) / 1024
        self.assertLess(grown_mb, 8, f"the server's RSS grew by {grown_mb:.1f} MB")
        get_health(self.server)


class ConnectionLimitTests(ServerTestCase):
    """MAX_CONNECTIONS=30: the 31st connection is told to come back, unless it is a probe."""

    server_settings = {"max_connections": 30}

    def assert_refused(self, path="/admin/login/"):
        answer = exchange(self.server, request(path))
        self.assertEqual(status_of(answer), 503, answer[:300])
        self.assertIn(b"retry-after: 5\r\n", answer)
        self.assertIn(b"connection: close\r\n", answer)
        self.assertTrue(answer.endswith(b"Server at its connection limit (30); retry later\n"), answer[:300])

    def test_connections_past_the_limit_get_503_and_one_warning(self):
        held = [connect(self.server) for _ in range(30)]
        try:
            for _ in range(10):
                self.assert_refused()
            # Probes still get their answer at the limit: an orchestrator must not
            # restart a server that is only under a flood.
            for path in ("/health", "/health", "/health", "/ready"):
                probe = exchange(self.server, request(path, b"connection: close"))
                self.assertEqual(status_of(probe), 200, probe[:300])
            # A probe path is no way in for anything else: an upgrade there is refused,
            # and takes no place from the probes (more of them than the reserve holds).
            upgrade = request(
                "/health",
                b"upgrade: websocket",
                b"connection: Upgrade",
                b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
                b"sec-websocket-version: 13",
            )
            for _ in range(20):
                self.assertEqual(status_of(exchange(self.server, upgrade)), 503)
            probe = exchange(self.server, request("/health", b"connection: close"))
            self.assertEqual(status_of(probe), 200, probe[:300])
            self.assert_refused(f"/stream/ScriptedTask/{ScriptedTask.objects.create(steps=1).pk}")
            for sock in held:  # accepted before the refused ones, and not refused
                sock.setblocking(False)
                with self.assertRaises(BlockingIOError):
                    sock.recv(1)
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: self._health_ok(), message="/health once the held connections closed")
        warning = "this process is at its connection limit (30 open"
        wait_for(lambda: warning in self.server.log(), message="the warning")
        self.assertEqual(self.server.log().count(warning), 1, "one line for the burst, not one per refusal")
        # The first refusal is logged at once; the rest are summed in a line 10 s on.
        self.assertIn("Refused 1 connection(s)", self.server.log())

    def test_open_streams_count_too(self):
        task = ScriptedTask.objects.create(steps=1, status="created")  # never started: the streams wait
        streams = []
        try:
            for _ in range(30):
                sock = connect(self.server)
                streams.append(sock)
                sock.sendall(request(task.get_stream_path()))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += sock.recv(65536)
                self.assertEqual(status_of(head), 200, head[:300])
            self.assert_refused()
        finally:
            for sock in streams:
                sock.close()
        wait_for(lambda: self._health_ok(), message="/health once the streams closed")

    def test_websocket_upgrades_give_their_place_back(self):
        upgrade = request(
            "/ws/",
            b"upgrade: websocket",
            b"connection: Upgrade",
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
            b"sec-websocket-version: 13",
        )
        for _ in range(35):  # one after another, more than the limit: uvicorn's WebSocket protocol answers
            answer = exchange(self.server, upgrade)
            self.assertNotIn(status_of(answer), (None, 101, 503), answer[:300])
        get_health(self.server)

    def _health_ok(self) -> bool:
        try:
            return httpx.get(f"{self.server.url}/health", timeout=5).text == "OK"
        except httpx.TransportError:
            return False


def shared_broker() -> str | None:
    """The suite's broker if processes share it, else a Redis on localhost if one answers."""
    url = get_settings().BROKER_URL
    if is_shared(url):
        return url
    url = os.environ.get("REDIS_URL_DISTRIBUTED", "redis://127.0.0.1:6379/0")
    try:
        import redis

        with redis.Redis.from_url(url, socket_timeout=1) as client:
            client.ping()
    except Exception:
        return None
    return url


class WorkersTests(TransactionTestCase):
    def test_each_worker_process_has_its_own_limits(self):
        broker = shared_broker()
        if broker is None:
            raise unittest.SkipTest("--workers needs a shared broker: no Redis answers at 127.0.0.1:6379")
        task = ScriptedTask.objects.create(steps=1, status="created")  # never started: its streams stay open
        server = ServerProcess(workers=2, broker_url=broker, max_connections=3, header_timeout=TIMEOUT)
        server.start()
        try:
            line = "Connections: at most 3 open in this process (MAX_CONNECTIONS)"
            wait_for(lambda: server.log().count(line) == 2, message="both workers' limits")
            socks = [connect(server) for _ in range(8)]
            try:
                answers = []
                for sock in socks:
                    sock.sendall(request(task.get_stream_path()))
                    head = b""
                    while b"\r\n\r\n" not in head and (chunk := sock.recv(65536)):
                        head += chunk
                    answers.append(status_of(head))
            finally:
                for sock in socks:
                    sock.close()
            # 2 processes x 3: at most 6 streams held, the rest refused.
            self.assertLessEqual(answers.count(200), 6, answers)
            self.assertGreaterEqual(answers.count(503), 2, answers)
            self.assertEqual(answers.count(200) + answers.count(503), 8, answers)
            get_health(server)
        finally:
            server.stop()
