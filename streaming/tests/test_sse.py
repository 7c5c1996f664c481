"""The direct socket path (server.py + sse.py), served in-process.

A real uvicorn server runs in the test's event loop on a real socket, so the
tests can look at the broker while raw-socket clients come and go.
"""

import asyncio
from unittest import mock

from django.db.models import QuerySet
from django.test import TransactionTestCase

from streaming.keys import TaskKey
from streaming.tests.support import eventually, parse_sse, serving
from streaming.tests.support import raw_request as open_stream
from streaming.tests.testapp.models import ScriptedTask


async def read_to_close(reader, timeout=10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


class DirectStreamTests(TransactionTestCase):
    async def test_a_stream_is_the_seed_format_and_ends_with_the_connection(self):
        task = await ScriptedTask.objects.acreate(steps=2, status="created")
        async with serving() as (_app, port):
            head, reader, writer = await open_stream(port, f"/stream/testapp/ScriptedTask/{task.pk}")
            await task.astart()
            body = await read_to_close(reader)
            writer.close()
        self.assertTrue(head.startswith("HTTP/1.1 200 OK\r\n"), head)
        self.assertIn("content-type: text/event-stream; charset=utf-8\r\n", head)
        self.assertIn("connection: close\r\n", head)
        self.assertNotIn("transfer-encoding", head)  # the bytes on the wire are the event bytes
        events = parse_sse(body.decode())
        self.assertEqual([e.event for e in events], ["step", "step", "complete"])
        self.assertEqual([e.id for e in events], [1, 2, 3])
        self.assertTrue(body.startswith(b"event: step\ndata: {"))

    async def test_clients_that_leave_leave_nothing_behind(self):
        task = await ScriptedTask.objects.acreate(steps=1, status="created")
        key = TaskKey.of(ScriptedTask, task.pk)
        async with serving() as (app, port):
            clients = [await open_stream(port, f"/stream/ScriptedTask/{task.pk}") for _ in range(50)]
            broker = app.node.hub
            await eventually(
                lambda: key in broker._channels and sum(s.live for s in broker._channels[key].subs) == 50,
                message="50 live subscribers",
            )
            for _head, _reader, writer in clients:
                writer.close()
            await eventually(lambda: key not in broker._channels, message="the channel to be dropped")
            # The server still serves: a new client gets the task's event.
            _head, reader, writer = await open_stream(port, f"/stream/ScriptedTask/{task.pk}")
            await task.astart()
            events = parse_sse((await read_to_close(reader)).decode())
            writer.close()
        self.assertEqual([e.event for e in events], ["step", "complete"])

    async def test_many_clients_of_one_task_share_one_row_lookup(self):
        task = await ScriptedTask.objects.acreate(steps=1, status="created")
        release = asyncio.Event()
        lookups = 0
        original = QuerySet.afirst

        async def held_lookup(queryset):
            nonlocal lookups
            lookups += 1
            await release.wait()  # every client arrives while the first lookup runs
            return await original(queryset)

        def opening():
            return sum(t.get_name() == "streaming-open" and not t.done() for t in asyncio.all_tasks())

        async with serving() as (_app, port):
            with mock.patch.object(QuerySet, "afirst", held_lookup):
                path = f"/stream/ScriptedTask/{task.pk}"
                connects = [asyncio.create_task(open_stream(port, path)) for _ in range(100)]
                await eventually(lambda: opening() == 100, message="100 requests being opened")
                release.set()
                clients = await asyncio.gather(*connects)
            self.assertEqual(lookups, 1)
            self.assertTrue(all(head.startswith("HTTP/1.1 200 OK") for head, _r, _w in clients))
            await task.astart()
            bodies = await asyncio.gather(*(read_to_close(reader) for _h, reader, _w in clients))
            for _h, _r, writer in clients:
                writer.close()
        self.assertEqual({len(parse_sse(b.decode())) for b in bodies}, {2})

    async def test_errors_are_complete_responses_and_the_server_goes_on(self):
        async with serving() as (_app, port):
            head, reader, writer = await open_stream(port, "/stream/ScriptedTask/999999")
            body = await read_to_close(reader)
            writer.close()
            self.assertTrue(head.startswith("HTTP/1.1 404 Not Found\r\n"), head)
            self.assertEqual(body, b"ScriptedTask 999999 not found\n")
            head, reader, writer = await open_stream(port, "/stream/ScriptedTask/1", "last-event-id: x\r\n")
            body = await read_to_close(reader)
            writer.close()
            self.assertTrue(head.startswith("HTTP/1.1 400 Bad Request\r\n"), head)
            self.assertIn(b"Malformed Last-Event-ID", body)

    async def test_head_and_upgrade_requests(self):
        task = await ScriptedTask.objects.acreate(steps=1, status="created")
        path = f"/stream/ScriptedTask/{task.pk}"
        async with serving() as (_app, port):
            # HEAD: 405 with its headers and no body.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"HEAD {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
            raw = await read_to_close(reader)
            writer.close()
            self.assertTrue(raw.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), raw)
            self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)
            # A WebSocket upgrade is uvicorn's to answer, not a stream (and no crash).
            upgrade = "connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
            upgrade += "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            head, reader, writer = await open_stream(port, path, upgrade)
            writer.close()
            self.assertTrue(head.startswith("HTTP/1.1 403 Forbidden\r\n"), head)
