"""streaming.client and stream_client.py: keep-alive comments are never events.

httpx-sse (up to at least 0.4.3, the newest release when this was written)
dispatches an empty ``message`` at the blank line after every comment once
an ``id:`` has been seen; the WHATWG parser dispatches nothing when the data
buffer is empty. The client drops such messages, so ``: keep-alive`` never
shows up as an event.
"""

import re
import subprocess
import sys
import threading
from unittest import mock

import httpx
from django.test import SimpleTestCase, TransactionTestCase

from streaming.client import (
    Event,
    StreamConnectError,
    StreamError,
    StreamHTTPError,
    stream_events,
)
from streaming.models import ContinueTask

from .support import REPO, ServerProcess, free_port, manage, wait_for

SSE_HEADERS = {"content-type": "text/event-stream"}

# The seed's one-liner (seeds/TESTING.md, "Trigger the Task to Continue").
CONTINUE_ONE_LINER = (
    "from streaming.models import ContinueTask; import asyncio; "
    "asyncio.run(ContinueTask.objects.filter(pk={pk}).aupdate(continue_field=True))"
)


def sse_response(*chunks: bytes) -> httpx.Response:
    """A streamed event-stream response delivering ``chunks`` one by one."""
    return httpx.Response(200, headers=SSE_HEADERS, content=iter(chunks))


def mock_client(*responses: httpx.Response | Exception) -> tuple[httpx.Client, list[httpx.Request]]:
    """A client whose n-th request gets the n-th response (or raises it); also returns the requests."""
    requests: list[httpx.Request] = []
    pending = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        answer = pending.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handler)), requests


def events_of(client: httpx.Client, **kwargs) -> list[Event]:
    with client:
        return list(stream_events("http://test/stream/ContinueTask/1", client=client, **kwargs))


class ParsingTests(SimpleTestCase):
    def test_comments_after_an_id_yield_no_events(self):
        client, _ = mock_client(
            sse_response(
                b": before anything\n\n",
                b'event: started\ndata: {"continue": false}\nid: 1\n\n',
                b": keep-alive\n\n",  # after an id: httpx-sse dispatches an empty message here
                b": keep-alive\n\n: keep-alive\n\n",
                b'event: final\ndata: {"continue": true}\nid: 2\n\n',
                b": keep-alive\n\n",
                b'event: complete\ndata: {"message": "done"}\nid: 3\n\n',
            )
        )
        self.assertEqual(
            events_of(client),
            [
                Event("started", "1", {"continue": False}),
                Event("final", "2", {"continue": True}),
                Event("complete", "3", {"message": "done"}),
            ],
        )

    def test_comments_split_across_chunks_yield_no_events(self):
        body = (
            b'event: started\ndata: {"n": 1}\nid: 1\n\n'
            b": keep-alive\n\n: keep-alive\r\n\r\n: keep-alive\r\r"
            b'event: complete\ndata: {"n": 2}\nid: 2\n\n'
        )
        client, _ = mock_client(sse_response(*(body[i : i + 1] for i in range(len(body)))))
        self.assertEqual(
            events_of(client),
            [Event("started", "1", {"n": 1}), Event("complete", "2", {"n": 2})],
        )

    def test_a_message_without_data_is_not_an_event(self):
        # A block with an event type and an id but no data line: the WHATWG
        # parser dispatches nothing (its data buffer is empty).
        client, _ = mock_client(
            sse_response(
                b'event: started\ndata: {"n": 1}\nid: 1\n\n',
                b"event: progress\nid: 2\n\n",
                b"id: 3\n\n",
                b'event: complete\ndata: {"n": 4}\nid: 4\n\n',
            )
        )
        self.assertEqual(
            events_of(client),
            [Event("started", "1", {"n": 1}), Event("complete", "4", {"n": 4})],
        )

    def test_data_that_is_not_json_is_kept_as_text(self):
        client, _ = mock_client(sse_response(b"data: hello\nid: 1\n\n", b"event: error\ndata: [1, 2]\n\n"))
        self.assertEqual(
            events_of(client),
            [Event("message", "1", "hello"), Event("error", "1", [1, 2])],
        )

    def test_stops_after_the_terminal_event(self):
        for terminal in ("complete", "error", "cancelled"):
            with self.subTest(terminal):
                client, requests = mock_client(
                    sse_response(
                        f'event: {terminal}\ndata: {{"n": 1}}\nid: 1\n\n'.encode(),
                        b'event: after\ndata: {"n": 2}\nid: 2\n\n',
                    )
                )
                self.assertEqual(events_of(client), [Event(terminal, "1", {"n": 1})])
                self.assertEqual(len(requests), 1)


class ReconnectTests(SimpleTestCase):
    """(Waits, backoff and Retry-After: test_task_stream.py.)"""

    def setUp(self):
        sleeping = mock.patch("streaming.client.sync.sleep")  # no real waits between mocked answers
        self.sleep = sleeping.start()
        self.addCleanup(sleeping.stop)

    def test_a_dropped_stream_resumes_after_the_last_event_not_a_keep_alive(self):
        client, requests = mock_client(
            # Ends (the server went away) after a keep-alive that followed event 2.
            sse_response(
                b'event: started\ndata: {"n": 1}\nid: 1\n\n',
                b'event: progress\ndata: {"n": 2}\nid: 2\n\n',
                b": keep-alive\n\n",
            ),
            sse_response(b": keep-alive\n\n", b'event: complete\ndata: {"n": 3}\nid: 3\n\n'),
        )
        reconnects: list[tuple[str | None, int]] = []
        events = events_of(client, on_reconnect=lambda last_id, n: reconnects.append((last_id, n)))
        self.assertEqual(
            [(e.type, e.id) for e in events], [("started", "1"), ("progress", "2"), ("complete", "3")]
        )
        self.assertEqual(reconnects, [("2", 1)])
        self.assertNotIn("last-event-id", requests[0].headers)
        self.assertEqual(requests[1].headers["last-event-id"], "2")
        self.assertEqual(requests[1].headers["accept"], "text/event-stream")

    def test_starts_after_a_given_last_event_id(self):
        client, requests = mock_client(sse_response(b'event: complete\ndata: {"n": 8}\nid: 8\n\n'))
        events_of(client, last_event_id="7")
        self.assertEqual(requests[0].headers["last-event-id"], "7")

    def test_gives_up_after_max_reconnects(self):
        refused = httpx.ConnectError("[Errno 111] Connection refused")
        client, requests = mock_client(
            sse_response(b'event: started\ndata: {"n": 1}\nid: 1\n\n', b": keep-alive\n\n"),
            refused,
            refused,
        )
        received: list[Event] = []
        with (
            client,
            self.assertRaisesRegex(
                StreamError,
                r"^connection lost and 2 reconnects failed \(last: ConnectError: .*Connection refused\)$",
            ),
        ):
            for event in stream_events("http://test/stream/ContinueTask/1", client=client, max_reconnects=2):
                received.append(event)
        self.assertEqual(received, [Event("started", "1", {"n": 1})])
        self.assertEqual([r.headers.get("last-event-id") for r in requests], [None, "1", "1"])

    def test_a_server_that_answers_200_and_ends_at_once_is_given_up_on(self):
        # A 200 with no event is no progress: it must not reset the count (or the
        # client would reconnect for ever).
        client, requests = mock_client(*(sse_response() for _ in range(3)))
        with (
            client,
            self.assertRaisesRegex(
                StreamError,
                r"^connection lost and 2 reconnects failed \(last: the server closed the stream\)$",
            ),
        ):
            list(stream_events("http://test/stream/ContinueTask/1", client=client, max_reconnects=2))
        self.assertEqual(len(requests), 3)


class StatusTests(SimpleTestCase):
    def test_204_ends_the_stream_without_events(self):
        client, requests = mock_client(httpx.Response(204))
        self.assertEqual(events_of(client), [])
        self.assertEqual(len(requests), 1)

    def test_other_statuses_raise_with_the_servers_message(self):
        client, _ = mock_client(httpx.Response(404, text="Task ContinueTask 1 not found\n"))
        with self.assertRaises(StreamHTTPError) as caught:
            events_of(client)
        self.assertEqual(caught.exception.status_code, 404)
        self.assertEqual(str(caught.exception), "HTTP 404: Task ContinueTask 1 not found")

    def test_a_200_that_is_not_an_event_stream_raises(self):
        client, _ = mock_client(httpx.Response(200, text="<html>", headers={"content-type": "text/html"}))
        with self.assertRaisesRegex(StreamError, "not an event stream"):
            events_of(client)

    def test_connection_refused_raises(self):
        url = f"http://127.0.0.1:{free_port()}/stream/ContinueTask/1"
        with self.assertRaisesRegex(StreamConnectError, "cannot connect to .*is the server running"):
            list(stream_events(url))


class KeepAliveCounter(threading.Thread):
    """Reads a stream raw, in parallel, counting ``: keep-alive`` lines after its first event."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events = 0
        self.keepalives_after_first_event = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            buffer = b""
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(30.0)) as response:
                for chunk in response.iter_raw():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.startswith(b"data:"):
                            self.events += 1
                        elif line == b": keep-alive" and self.events:
                            self.keepalives_after_first_event += 1
        except BaseException as exc:
            self.error = exc


TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?\+00:00"


def seed_continue_output(port: int, pk: int) -> str:
    """The seed's ContinueTask session as a regex (timestamps vary)."""
    rule = "=" * 60
    text = (
        f"{rule}\n"
        f"Connecting to: http://127.0.0.1:{port}/stream/ContinueTask/{pk}\n"
        f"{rule}\n"
        "\n"
        "[1] Event: STARTED\n"
        "    Timestamp: TS\n"
        "    message: Waiting for signal...\n"
        "    continue: False\n"
        "\n"
        "[2] Event: FINAL\n"
        "    Timestamp: TS\n"
        "    message: Continue signal received\n"
        "    continue: True\n"
        "\n"
        "[3] Event: COMPLETE\n"
        "    Timestamp: TS\n"
        "    message: Task completed successfully\n"
        "\n"
        f"{rule}\n"
        "Stream ended with: COMPLETE\n"
        "Total events received: 3\n"
        f"{rule}\n"
    )
    return re.escape(text).replace("TS", TIMESTAMP)


class StreamClientKeepAliveTests(TransactionTestCase):
    def setUp(self):
        self.server = ServerProcess(keepalive_interval=0.3).start()
        self.addCleanup(self.server.stop)

    def test_seed_continue_flow_prints_no_event_for_keep_alives(self):
        task = ContinueTask.objects.create(poll_interval=0.1)
        self.assertEqual(task.status, "pending")
        client = subprocess.Popen(
            [
                sys.executable,
                "stream_client.py",
                "ContinueTask",
                str(task.pk),
                "--port",
                str(self.server.port),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(client.stderr.close)
        self.addCleanup(client.stdout.close)
        self.addCleanup(client.kill)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(client.stdout), daemon=True)
        reader.start()
        # The client has printed the whole STARTED block: it is subscribed and idle.
        wait_for(lambda: "    continue: False\n\n" in "".join(lines), timeout=20, message="the STARTED event")

        # Keep-alives go to every subscriber of an idle task at the same ticks:
        # this parallel reader, subscribed after the client, sees no more of them.
        counter = KeepAliveCounter(f"{self.server.url}{task.get_stream_path()}")
        counter.start()
        wait_for(
            lambda: counter.error or counter.keepalives_after_first_event >= 3,
            timeout=20,
            message="three keep-alives after the first event",
        )
        self.assertIsNone(counter.error)

        shell = manage("shell", "-c", CONTINUE_ONE_LINER.format(pk=task.pk))
        self.assertEqual(shell.returncode, 0, shell.stderr)

        returncode = client.wait(30)
        err = client.stderr.read()
        reader.join(10)
        counter.join(10)
        out = "".join(lines)
        self.assertEqual((returncode, err), (0, ""))
        self.assertIsNotNone(re.fullmatch(seed_continue_output(self.server.port, task.pk), out), out)
        self.assertNotIn("MESSAGE", out)
        self.assertGreaterEqual(counter.keepalives_after_first_event, 3)
        self.assertEqual(counter.events, 3)  # the raw reader saw the same stream end


class ProgressBarTests(SimpleTestCase):
    """stream_client.py --progress: what the bar shows for each kind of event."""

    def frames(self, *events: Event) -> list[str]:
        import io
        from contextlib import redirect_stdout

        from tqdm import tqdm

        import stream_client

        out = io.StringIO()
        with redirect_stdout(out):
            bar = stream_client.ProgressBar(tqdm)
            for event in events:
                bar.update(event)
            bar.close()
        return [frame for frame in re.split(r"[\r\n]", out.getvalue()) if frame.strip()]

    def assertShown(self, frames: list[str], *patterns: str) -> None:
        """Each pattern matches a frame, in this order, and the last one the final frame too."""
        position = 0
        for pattern in patterns:
            found = next((i for i in range(position, len(frames)) if re.search(pattern, frames[i])), None)
            self.assertIsNotNone(found, f"{pattern!r} in {frames[position:]}")
            position = found
        self.assertRegex(frames[-1], patterns[-1])  # the bar as it is left

    def test_step_and_total_steps_or_total(self):
        frames = self.frames(
            Event("start", "1", {"message": "Go", "total_steps": 4}),
            Event("progress", "2", {"step": 1, "total_steps": 4, "message": "Step 1 of 4"}),
            Event("progress", "3", {"step": 3, "total": 4, "message": "Step 3 of 4"}),
        )
        self.assertShown(
            frames, r"^Go:\s+0%.* 0/4 ", r"^Step 1 of 4:\s+25%.* 1/4 ", r"^Step 3 of 4:\s+75%.* 3/4 "
        )

    def test_a_fraction_from_0_to_1(self):
        frames = self.frames(
            Event("progress", "1", {"progress": 0.25}),
            Event("progress", "2", {"progress": 1.7}),  # clamped
        )
        self.assertShown(frames, r"^\s*25%.* 25/100 ", r"^\s*100%.* 100/100 ")

    def test_complete_fills_the_bar_when_the_steps_came_before_the_client(self):
        # A client that connects after the last step gets the latest event first: complete.
        frames = self.frames(
            Event("complete", "5", {"message": "Task completed successfully", "total_steps": 3})
        )
        self.assertShown(frames, r"^Task completed successfully: 100%.* 3/3 ")

    def test_an_error_shows_its_type_and_message(self):
        frames = self.frames(
            Event("progress", "1", {"step": 1, "total_steps": 3}),
            Event("error", "2", {"type": "ValueError", "message": "bad row"}),
        )
        self.assertShown(frames, r"^\s*33%.* 1/3 ", r"^ValueError: bad row:\s+33%.* 1/3 ")
