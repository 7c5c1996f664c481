"""TaskStream and AsyncTaskStream (streaming.client): every case runs through both.

Failure modes a real server does not produce on demand (a drop mid-event, a
reset, ``retry:`` values, 5xx, garbage) come from a scripted server over real
sockets (scripted_http.py); the rest from a real runserver_stream subprocess
(test_task_stream_e2e.py).
"""

import asyncio
import contextlib
import json
import random
from collections.abc import Iterator
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

from django.test import SimpleTestCase
from httpx_sse import ServerSentEvent

from streaming.client import (
    AccessExpired,
    AsyncMultiStream,
    AsyncTaskStream,
    Event,
    MultiStream,
    StreamConnectError,
    StreamError,
    StreamGaveUp,
    StreamHTTPError,
    TaskCancelled,
    TaskFailed,
    TaskStream,
)
from streaming.client.protocol import JITTER, reconnect_delay

from .scripted_http import (
    Pause,
    Reset,
    ScriptedServer,
    Shutdown,
    chunk,
    chunked_head,
    reply,
    sse,
    status_reply,
    stream,
)
from .support import free_port

KINDS = ("sync", "async")


def drive(kind: str, url: str, *, result: bool = False, **kwargs: Any) -> tuple[list[Event], Any]:
    """Read the stream with TaskStream (``sync``) or AsyncTaskStream (``async``):
    (the events, then the outcome: ``result()``'s value, or the exception
    iteration or ``result()`` raised; None without ``result``)."""
    events: list[Event] = []
    if kind == "sync":
        with TaskStream(url, **kwargs) as sync_stream:
            try:
                for event in sync_stream:
                    events.append(event)
                return events, sync_stream.result() if result else None
            except Exception as exc:
                return events, exc

    async def read() -> Any:
        async with AsyncTaskStream(url, **kwargs) as async_stream:
            try:
                async for event in async_stream:
                    events.append(event)
                return await async_stream.result() if result else None
            except Exception as exc:
                return exc

    return events, asyncio.run(read())


@contextlib.contextmanager
def instant_sleeps() -> Iterator[list[float]]:
    """Record the client's waits (sync and async) instead of waiting them."""
    waits: list[float] = []

    async def asleep(seconds: float) -> None:
        waits.append(seconds)

    with (
        mock.patch("streaming.client.sync.sleep", waits.append),
        mock.patch("streaming.client.aio.sleep", asleep),
    ):
        yield waits


def ids(events: list[Event]) -> list[str | None]:
    return [event.id for event in events]


class ClientCase(SimpleTestCase):
    def each_kind(self) -> Iterator[str]:
        for kind in KINDS:
            with self.subTest(kind):
                yield kind

    def assertWithin(self, value: float, low: float, high: float) -> None:
        self.assertTrue(low <= value <= high, f"{value} not within [{low}, {high}]")


class ResumeTests(ClientCase):
    def test_a_drop_mid_event_resumes_after_the_last_whole_event(self):
        for kind in self.each_kind():
            partial = b'event: step\ndata: {"n": 3}\nid: 3'  # no blank line: never dispatched
            with (
                ScriptedServer(
                    stream(sse("step", 1, {"n": 1}), sse("step", 2, {"n": 2}), partial),
                    stream(sse("step", 3, {"n": 3}), sse("complete", 4, {"done": True})),
                ) as server,
                instant_sleeps(),
            ):
                events, outcome = drive(kind, server.url(), result=True)
            self.assertEqual(ids(events), ["1", "2", "3", "4"])  # nothing lost, nothing twice
            self.assertEqual(outcome, {"done": True})
            self.assertEqual([r.headers.get("last-event-id") for r in server.requests], [None, "2"])
            self.assertEqual(server.requests[1].headers["accept"], "text/event-stream")

    def test_a_reset_mid_chunk_resumes(self):
        for kind in self.each_kind():
            with (
                ScriptedServer(
                    [
                        chunked_head(),
                        chunk(sse("step", 1, {"n": 1})),
                        b"40\r\nevent: st",
                        Pause(0.05),
                        Reset(),
                    ],
                    stream(sse("complete", 2, {"n": 2})),
                ) as server,
                instant_sleeps(),
            ):
                events, outcome = drive(kind, server.url())
            self.assertIsNone(outcome)
            self.assertEqual(ids(events), ["1", "2"])
            self.assertEqual(server.requests[1].headers["last-event-id"], "1")

    def test_an_event_after_the_terminal_one_is_never_read(self):
        for kind in self.each_kind():
            with ScriptedServer(stream(sse("complete", 1, {"a": 1}), sse("step", 2, {"n": 2}))) as server:
                events, outcome = drive(kind, server.url(), result=True)
            self.assertEqual([e.type for e in events], ["complete"])
            self.assertEqual(outcome, {"a": 1})
            self.assertEqual(len(server.requests), 1)

    def test_the_urls_own_query_is_kept(self):
        for kind in self.each_kind():
            with ScriptedServer(stream(sse("complete", 1, {}))) as server:
                drive(kind, server.url("/stream/ScriptedTask/1?history=all"))
            self.assertEqual(server.requests[0].path, "/stream/ScriptedTask/1?history=all")

    def test_starts_after_a_given_last_event_id(self):
        for kind in self.each_kind():
            with ScriptedServer(stream(sse("complete", 8, {"n": 8}))) as server:
                drive(kind, server.url(), last_event_id=7)
            self.assertEqual(server.requests[0].headers["last-event-id"], "7")


class WaitTests(ClientCase):
    def test_the_servers_retry_field_sets_the_wait(self):
        for kind in self.each_kind():
            with ScriptedServer(
                stream(b"retry: 300\n\n", sse("step", 1, {"n": 1})),
                stream(sse("complete", 2, {})),
            ) as server:
                events, outcome = drive(kind, server.url(), retry=5.0)
            self.assertIsNone(outcome)
            self.assertEqual(ids(events), ["1", "2"])
            gap = server.requests[1].arrived - server.requests[0].arrived
            # 300 ms, spread by up to half again; not the 5 s the client started with.
            self.assertWithin(gap, 0.3, 0.45 + 1.0)

    def test_backoff_doubles_while_nothing_comes_caps_and_resets_after_an_event(self):
        for kind in self.each_kind():
            bad = reply(502, "Bad Gateway\n")
            with (
                ScriptedServer(
                    stream(sse("step", 1, {})),  # then drops
                    bad,
                    bad,
                    bad,
                    bad,
                    stream(sse("step", 2, {})),  # progress: the count starts again
                    bad,
                    stream(sse("complete", 3, {})),
                ) as server,
                instant_sleeps() as waits,
            ):
                events, outcome = drive(kind, server.url(), retry=0.1, max_delay=0.5)
            self.assertIsNone(outcome)
            self.assertEqual(ids(events), ["1", "2", "3"])
            self.assertEqual(len(waits), 7)
            nominal = [0.1, 0.2, 0.4, 0.5, 0.5, 0.1, 0.2]
            for wait, delay in zip(waits, nominal, strict=True):
                self.assertWithin(wait, delay, min(0.5, delay * (1 + JITTER)))
            self.assertEqual(server.requests[-1].headers["last-event-id"], "2")

    def test_jitter_spreads_each_wait_over_at_most_half_again(self):
        self.assertEqual(reconnect_delay(1.0, 1, cap=30, rand=lambda: 0.0), 1.0)
        self.assertEqual(reconnect_delay(1.0, 1, cap=30, rand=lambda: 1.0), 1.5)
        self.assertEqual(reconnect_delay(1.0, 3, cap=30, rand=lambda: 1.0), 6.0)
        self.assertEqual(reconnect_delay(1.0, 10, cap=30, rand=lambda: 1.0), 30.0)  # capped
        rng = random.Random(11)
        draws = [reconnect_delay(2.0, 1, cap=30, rand=rng.random) for _ in range(500)]
        self.assertTrue(all(2.0 <= d <= 3.0 for d in draws))
        self.assertGreater(max(draws) - min(draws), 0.9)  # spread over the whole range

    def test_a_503_with_retry_after_is_retried_after_that_long(self):
        for kind in self.each_kind():
            with (
                ScriptedServer(
                    reply(503, "Server at its stream limit; retry later\n", headers="retry-after: 5\r\n"),
                    stream(sse("complete", 1, {})),
                ) as server,
                instant_sleeps() as waits,
            ):
                events, outcome = drive(kind, server.url())
            self.assertIsNone(outcome)
            self.assertEqual(ids(events), ["1"])
            self.assertEqual(len(waits), 1)
            self.assertWithin(waits[0], 5.0, 7.5)

    def test_busy_for_ever_gives_up_after_max_reconnects(self):
        for kind in self.each_kind():
            busy = reply(503, "busy\n", headers="retry-after: 600\r\n")
            with ScriptedServer(busy, busy, busy) as server, instant_sleeps() as waits:
                events, outcome = drive(kind, server.url(), max_reconnects=2)
            self.assertEqual(events, [])
            self.assertIsInstance(outcome, StreamGaveUp)
            self.assertEqual(str(outcome), "connection lost and 2 reconnects failed (last: HTTP 503: busy)")
            self.assertEqual(waits, [60.0, 60.0])  # a minute at most
            self.assertEqual(len(server.requests), 3)

    def test_server_errors_are_retried(self):
        for kind in self.each_kind():
            with (
                ScriptedServer(
                    reply(500, "Internal Server Error\n"),
                    reply(503, "Streaming node is not running\n"),
                    stream(sse("complete", 1, {"ok": 1})),
                ) as server,
                instant_sleeps() as waits,
            ):
                events, outcome = drive(kind, server.url(), result=True)
            self.assertEqual(ids(events), ["1"])
            self.assertEqual(outcome, {"ok": 1})
            self.assertEqual(len(waits), 2)
            self.assertEqual(len(server.requests), 3)

    def test_a_server_that_goes_away_is_given_up_on(self):
        for kind in self.each_kind():
            # The server is gone (connections refused) after the first stream.
            with (
                ScriptedServer(stream(sse("step", 1, {}), end=Shutdown())) as server,
                instant_sleeps() as waits,
            ):
                events, outcome = drive(kind, server.url(), max_reconnects=3)
            self.assertEqual(ids(events), ["1"])
            self.assertIsInstance(outcome, StreamGaveUp)
            self.assertIn("3 reconnects failed (last: ConnectError", str(outcome))
            self.assertEqual(len(waits), 3)


class GiveUpTests(ClientCase):
    def test_streams_that_stay_open_a_while_are_not_failures_even_without_events(self):
        # A quiet stream cut now and then (a proxy's connection age): healthy.
        quiet = stream(b": keep-alive\n\n", Pause(0.3))
        with mock.patch("streaming.client.protocol.HEALTHY_STREAM", 0.2):
            for kind in self.each_kind():
                scripts = (quiet, quiet, quiet, quiet, stream(sse("complete", 1, {})))
                with ScriptedServer(*scripts) as server, instant_sleeps():
                    events, outcome = drive(kind, server.url(), max_reconnects=2)
                self.assertIsNone(outcome)
                self.assertEqual(ids(events), ["1"])
                # Dropped at once, the same streams are failures: given up on.
                with ScriptedServer(*[stream(b": keep-alive\n\n")] * 3) as server, instant_sleeps():
                    events, outcome = drive(kind, server.url(), max_reconnects=2)
                self.assertIsInstance(outcome, StreamGaveUp)

    def test_iterating_again_after_giving_up_starts_a_new_count(self):
        busy = reply(503, "busy\n", headers="retry-after: 1\r\n")
        with (
            ScriptedServer(busy, busy, stream(sse("complete", 1, {"v": 2}))) as server,
            instant_sleeps(),
            TaskStream(server.url(), max_reconnects=1) as task_stream,
        ):
            with self.assertRaises(StreamGaveUp):
                list(task_stream)
            self.assertEqual(len(server.requests), 2)
            self.assertEqual(task_stream.result(), {"v": 2})


class FinalAnswerTests(ClientCase):
    def test_client_errors_are_final_with_the_servers_message(self):
        for status in (400, 401, 403, 404, 405):
            for kind in KINDS:
                with self.subTest(status=status, kind=kind):
                    message = f"Refused for a reason ({status})"
                    with ScriptedServer(reply(status, message + "\n")) as server, instant_sleeps() as waits:
                        events, outcome = drive(kind, server.url(), result=True)
                    self.assertEqual(events, [])
                    self.assertIsInstance(outcome, StreamHTTPError)
                    self.assertEqual((outcome.status_code, outcome.message), (status, message))
                    self.assertEqual(str(outcome), f"HTTP {status}: {message}")
                    self.assertEqual((len(server.requests), waits), (1, []))  # asked once, no retry

    def test_a_long_error_page_is_cut_to_its_first_line_short(self):
        page = "<html><body>" + "x" * 5000 + "</body></html>\n<p>more</p>\n"
        with ScriptedServer(reply(404, page, content_type="text/html")) as server:
            _, outcome = drive("sync", server.url())
        self.assertEqual(outcome.message, page[:300])

    def test_a_refused_first_connection_raises_at_once(self):
        for kind in self.each_kind():
            with instant_sleeps() as waits:
                _, outcome = drive(kind, f"http://127.0.0.1:{free_port()}/stream/ScriptedTask/1")
            self.assertIsInstance(outcome, StreamConnectError)
            self.assertRegex(str(outcome), "cannot connect to .*is the server running")
            self.assertEqual(waits, [])

    def test_a_200_that_is_not_an_event_stream_raises(self):
        for kind in self.each_kind():
            with ScriptedServer(reply(200, "<html>", content_type="text/html")) as server:
                _, outcome = drive(kind, server.url())
            self.assertIsInstance(outcome, StreamError)
            self.assertIn("not an event stream", str(outcome))
            self.assertEqual(len(server.requests), 1)

    def test_garbage_in_an_event_stream_is_skipped_or_kept_as_text(self):
        for kind in self.each_kind():
            with ScriptedServer(
                stream(
                    b"garbage line\nnonsense: 1\n\n",
                    b"\xff\xfe\x00\n\n",
                    b": a comment\n\n",
                    sse("step", 1, "not json {"),
                    b"retry: soon\n\n",
                    sse("complete", 2, {"n": 2}),
                )
            ) as server:
                events, outcome = drive(kind, server.url())
            self.assertIsNone(outcome)
            self.assertEqual(events, [Event("step", "1", "not json {"), Event("complete", "2", {"n": 2})])

    def test_a_204_ends_the_stream_and_result_reads_the_status(self):
        cases = [
            (status_reply(status="completed", final_value=[1, 2]), [1, 2]),
            (status_reply(status="completed", final_value=None), None),
            (
                status_reply(status="failed", error={"type": "ValueError", "message": "bad input"}),
                TaskFailed("ValueError", "bad input"),
            ),
            (status_reply(status="cancelled"), TaskCancelled()),
        ]
        for status, expected in cases:
            for kind in KINDS:
                with self.subTest(expected=expected, kind=kind):
                    with ScriptedServer(reply(204), status) as server:
                        events, outcome = drive(kind, server.url(), result=True, last_event_id=9)
                    self.assertEqual(events, [])
                    if isinstance(expected, Exception):
                        self.assertIs(type(outcome), type(expected))
                        self.assertEqual(str(outcome), str(expected))
                    else:
                        self.assertEqual(outcome, expected)
                    stream_request, status_request = server.requests
                    self.assertEqual(stream_request.headers["last-event-id"], "9")
                    self.assertEqual(status_request.headers["accept"], "application/json")
                    self.assertNotIn("last-event-id", status_request.headers)


class OutcomeTests(ClientCase):
    def test_a_returned_dict_comes_from_the_event_alone(self):
        for kind in self.each_kind():
            data = {"rows": 3, "_task_id": 1, "_model": "ScriptedTask", "_timestamp": "now"}
            with ScriptedServer(stream(sse("complete", 1, data))) as server:
                _, outcome = drive(kind, server.url(), result=True)
            self.assertEqual(outcome, {"rows": 3})
            self.assertEqual(len(server.requests), 1)

    def test_an_event_that_leaves_the_value_open_asks_the_status(self):
        # {"result": 5} is what the runner sends for a returned 5, and for a
        # returned {"result": 5}; {} for None and for {}.
        for data, final_value in (({"result": 5}, 5), ({"result": 5}, {"result": 5}), ({}, None), ({}, {})):
            for kind in KINDS:
                with self.subTest(final_value=final_value, kind=kind):
                    with ScriptedServer(
                        stream(sse("complete", 1, {**data, "_task_id": 1})),
                        status_reply(status="completed", final_value=final_value),
                    ) as server:
                        _, outcome = drive(kind, server.url(), result=True)
                    self.assertEqual(outcome, final_value)
                    self.assertEqual(server.requests[1].headers["accept"], "application/json")

    def test_an_error_event_raises_task_failed(self):
        for kind in self.each_kind():
            error = {"type": "ValueError", "message": "failing at step 2", "_task_id": 1}
            with ScriptedServer(stream(sse("step", 1, {}), sse("error", 2, error))) as server:
                events, outcome = drive(kind, server.url(), result=True)
            self.assertEqual([e.type for e in events], ["step", "error"])
            self.assertIsInstance(outcome, TaskFailed)
            self.assertEqual((outcome.error_type, outcome.message), ("ValueError", "failing at step 2"))
            self.assertEqual(str(outcome), "ValueError: failing at step 2")
            self.assertEqual(len(server.requests), 1)

    def test_a_cancelled_event_raises_task_cancelled(self):
        for kind in self.each_kind():
            with ScriptedServer(stream(sse("cancelled", 4, {"message": "Task cancelled"}))) as server:
                _, outcome = drive(kind, server.url(), result=True)
            self.assertIsInstance(outcome, TaskCancelled)
            self.assertEqual(str(outcome), "Task cancelled")

    def test_result_without_iterating_reads_to_the_end(self):
        with (
            ScriptedServer(stream(sse("step", 1, {}), sse("complete", 2, {"v": 1}))) as server,
            TaskStream(server.url()) as sync_stream,
        ):
            self.assertEqual(sync_stream.result(), {"v": 1})
            self.assertEqual(sync_stream.last_event_id, "2")
            self.assertEqual(list(sync_stream), [])  # ended: iterating again gives nothing
        self.assertEqual(len(server.requests), 1)


class TokenTests(ClientCase):
    def test_the_token_goes_as_a_bearer_header_on_every_request(self):
        for kind in self.each_kind():
            with (
                ScriptedServer(
                    stream(sse("step", 1, {})),
                    stream(sse("complete", 2, {})),
                    status_reply(status="completed", final_value=7),
                ) as server,
                instant_sleeps(),
            ):
                _, outcome = drive(kind, server.url(), result=True, token="s3cr3t.token")
            self.assertEqual(outcome, 7)
            self.assertEqual(len(server.requests), 3)
            for request in server.requests:
                self.assertEqual(request.headers["authorization"], "Bearer s3cr3t.token")
                self.assertNotIn("s3cr3t", request.path)

    def test_access_expired_ends_with_an_error_saying_so(self):
        for kind in self.each_kind():
            expired = {"message": "Stream token expired", "expired_at": "2026-12-01T18:00:00+00:00"}
            with ScriptedServer(
                stream(sse("step", 1, {}), sse("step", 2, {}), sse("access_expired", None, expired))
            ) as server:
                events, outcome = drive(kind, server.url(), token="t")
            self.assertEqual(ids(events), ["1", "2"])  # access_expired is not an event of the task
            self.assertIsInstance(outcome, AccessExpired)
            self.assertEqual(outcome.last_event_id, "2")
            self.assertEqual(outcome.expired_at, "2026-12-01T18:00:00+00:00")
            self.assertIn(
                "expired at 2026-12-01T18:00:00+00:00; resume after event 2 with a new token", str(outcome)
            )
            self.assertEqual(len(server.requests), 1)


class ConstructionTests(SimpleTestCase):
    def test_a_stream_named_by_base_url_model_and_id(self):
        self.assertEqual(TaskStream("http://h:1/", "Report", 7).url, "http://h:1/stream/Report/7")
        self.assertEqual(
            AsyncTaskStream("http://h:1", "app/Report", "x").url, "http://h:1/stream/app/Report/x"
        )
        self.assertEqual(TaskStream("http://h:1/stream/Report/7").url, "http://h:1/stream/Report/7")
        with self.assertRaisesRegex(TypeError, "give both model and task_id"):
            TaskStream("http://h:1", "Report")


def read_many(
    kind: str, base_url: str, *, stop_after: int | None = None, **kwargs: Any
) -> tuple[list[Event], Any, Any]:
    """Read a multiplexed stream with MultiStream or AsyncMultiStream: (the events,
    the exception raised or None, the stream); ``stop_after``: leave after that many events."""
    events: list[Event] = []
    if kind == "sync":
        with MultiStream(base_url, **kwargs) as sync_stream:
            try:
                for event in sync_stream:
                    events.append(event)
                    if stop_after and len(events) >= stop_after:
                        break
            except Exception as exc:
                return events, exc, sync_stream
            return events, None, sync_stream

    async def read() -> Any:
        async with AsyncMultiStream(base_url, **kwargs) as async_stream:
            try:
                async for event in async_stream:
                    events.append(event)
                    if stop_after and len(events) >= stop_after:
                        break
            except Exception as exc:
                return exc, async_stream
            return None, async_stream

    problem, read_stream = asyncio.run(read())
    return events, problem, read_stream


def mux_event(event_type: str, model: str, task_id: int, seq: int, **data: Any) -> bytes:
    return sse(event_type, seq, {**data, "_task_id": task_id, "_model": model, "_timestamp": "t"})


def query(request) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(request.path).query)


class MultiStreamTests(ClientCase):
    def test_a_cursor_per_task_and_ended_tasks_are_left_out_of_the_reconnect(self):
        for kind in self.each_kind():
            with (
                ScriptedServer(
                    stream(
                        mux_event("step", "ScriptedTask", 1, 1),
                        mux_event("step", "ScriptedTask", 2, 7),
                        mux_event("complete", "ScriptedTask", 1, 2, value=1),
                        mux_event("step", "ScriptedTask", 3, 4),
                    ),  # then drops
                    stream(
                        mux_event("step", "ScriptedTask", 2, 7),  # sent again: not handed out twice
                        mux_event("complete", "ScriptedTask", 2, 8),
                        mux_event("error", "ScriptedTask", 3, 5, type="E", message="m"),
                        mux_event("step", "ScriptedTask", 9, 1),  # after every task ended: never read
                    ),
                ) as server,
                instant_sleeps() as waits,
            ):
                events, problem, read = read_many(
                    kind, server.base_url, tasks=["ScriptedTask/1", ("ScriptedTask", 2), "ScriptedTask/3@3"]
                )
            self.assertIsNone(problem)
            self.assertEqual(
                [(e.task, e.id) for e in events],
                [(("ScriptedTask", "1"), "1"), (("ScriptedTask", "2"), "7"), (("ScriptedTask", "1"), "2"),
                 (("ScriptedTask", "3"), "4"), (("ScriptedTask", "2"), "8"), (("ScriptedTask", "3"), "5")],
            )  # fmt: skip
            first, second = server.requests
            self.assertEqual(urlsplit(first.path).path, "/stream/")
            self.assertEqual(
                query(first),
                [("task", "ScriptedTask/1"), ("task", "ScriptedTask/2"), ("task", "ScriptedTask/3@3")],
            )
            self.assertEqual(query(second), [("task", "ScriptedTask/2@7"), ("task", "ScriptedTask/3@4")])
            self.assertNotIn("last-event-id", second.headers)
            self.assertEqual(len(waits), 1)
            self.assertTrue(read.ended)
            self.assertEqual({key: e.type for key, e in read.terminals.items()},
                             {("ScriptedTask", "1"): "complete", ("ScriptedTask", "2"): "complete",
                              ("ScriptedTask", "3"): "error"})  # fmt: skip
            self.assertEqual(read.cursors[("ScriptedTask", "3")], 5)

    def test_a_feeds_tasks_join_the_reconnect_named_as_the_feed_names_them(self):
        for kind in self.each_kind():
            with (
                ScriptedServer(
                    stream(
                        mux_event("step", "ExportTask", 5, 3),
                        mux_event("step", "ExportTask", 6, 1),
                        mux_event("complete", "ExportTask", 6, 2),
                    ),
                    stream(b": keep-alive\n\n", mux_event("complete", "ExportTask", 5, 4)),
                ) as server,
                instant_sleeps(),
            ):
                events, problem, read = read_many(
                    kind, server.base_url, feeds=["shop/ExportTask"], history=True, stop_after=4
                )
            self.assertIsNone(problem)
            self.assertEqual([e.id for e in events], ["3", "1", "2", "4"])
            self.assertFalse(read.ended, "a feed does not end by itself")
            self.assertEqual(query(server.requests[0]), [("feed", "shop/ExportTask"), ("history", "all")])
            self.assertEqual(
                query(server.requests[1]),
                [("task", "shop/ExportTask/5@3"), ("feed", "shop/ExportTask"), ("history", "all")],
            )

    def test_an_app_label_names_the_task_in_the_request_only(self):
        for kind in self.each_kind():
            with (
                ScriptedServer(
                    stream(mux_event("step", "ScriptedTask", 1, 1)),
                    stream(mux_event("complete", "ScriptedTask", 1, 2)),
                ) as server,
                instant_sleeps(),
            ):
                events, problem, _ = read_many(kind, server.base_url, tasks=["testapp/ScriptedTask/1"])
            self.assertIsNone(problem)
            self.assertEqual([e.id for e in events], ["1", "2"])
            self.assertEqual(query(server.requests[1]), [("task", "testapp/ScriptedTask/1@1")])

    def test_204_ends_it(self):
        for kind in self.each_kind():
            with ScriptedServer(reply(204)) as server:
                events, problem, read = read_many(kind, server.base_url, tasks=["ScriptedTask/1@9"])
            self.assertEqual((events, problem, read.ended, len(server.requests)), ([], None, True, 1))

    def test_refusals_are_final_and_access_expired_says_so(self):
        for kind in self.each_kind():
            with ScriptedServer(reply(403, "Not allowed to watch PrivateTask 2\n")) as server:
                _, problem, _ = read_many(
                    kind, server.base_url, tasks=["PrivateTask/1", "PrivateTask/2"], token="t"
                )
            self.assertIsInstance(problem, StreamHTTPError)
            self.assertEqual(str(problem), "HTTP 403: Not allowed to watch PrivateTask 2")
            self.assertEqual(len(server.requests), 1)
            self.assertEqual(server.requests[0].headers["authorization"], "Bearer t")
            expired = sse("access_expired", None, {"message": "Stream token expired"})
            with ScriptedServer(stream(mux_event("step", "PrivateTask", 1, 1), expired)) as server:
                events, problem, read = read_many(kind, server.base_url, tasks=["PrivateTask/1"], token="t")
            self.assertEqual(len(events), 1)
            self.assertIsInstance(problem, AccessExpired)
            self.assertEqual(read.cursors, {("PrivateTask", "1"): 1})

    def test_at_most_a_hundred_tasks_are_named_in_a_request(self):
        with self.assertRaisesRegex(ValueError, "at most 100 tasks per multiplexed stream, not 101"):
            MultiStream("http://127.0.0.1:1", [f"ScriptedTask/{n}" for n in range(101)])
        # A feed that brought in more: the first hundred are named, the rest rejoin through the feed.
        state = MultiStream("http://127.0.0.1:1", ["ScriptedTask/0"], feeds=["ScriptedTask"]).state
        for n in range(1, 150):
            state.receive(
                ServerSentEvent("step", json.dumps({"_model": "ScriptedTask", "_task_id": n}), str(n))
            )
        params = state.params()
        self.assertEqual(params[0], ("task", "ScriptedTask/0"))
        self.assertEqual(params[1], ("task", "ScriptedTask/1@1"))
        self.assertEqual(len([p for p in params if p[0] == "task"]), 100)
        self.assertEqual(params[-1], ("feed", "ScriptedTask"))

    def test_malformed_task_names_are_refused_before_any_request(self):
        for bad in ("ScriptedTask", "ScriptedTask/1@x", "/1"):
            with self.subTest(bad), self.assertRaisesRegex(ValueError, "is not a task"):
                MultiStream("http://127.0.0.1:1", [bad])
