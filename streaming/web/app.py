"""The ASGI app: SSE streams, /health, and Django for every other path.

Streaming requests never enter Django's request machinery: a stream is a
cursor on the broker plus the connection's send loop. Django still serves
the admin and everything else on the same port.
"""

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError

from ..keys import TaskKey
from ..node import Node
from ..tasks import store
from ..tasks.registry import UnknownModel, resolve_model

logger = logging.getLogger(__name__)

STREAM_PATH = re.compile(r"^/stream/(?:(?P<app>[^/]+)/)?(?P<model>[^/]+)/(?P<pk>[^/]+)/?$")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]
# uvicorn's protocol (see server.py) puts the transport's abort here so a
# stalled client can be cut off at once instead of waiting on its buffer.
ABORT_EXTENSION = "streaming.abort"


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete (non-stream) response to a stream request."""

    status: int
    body: str
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple = ()


class BadRequest(Exception):
    status = 400


class NotFound(Exception):
    status = 404


class StreamingApp:
    def __init__(self, django_app=None, *, node_factory=Node):
        self.django_app = django_app
        self.node_factory = node_factory
        self.node: Node | None = None
        self._lookups: dict[tuple, asyncio.Future] = {}

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        if kind == "http":
            path = scope["path"]
            if path == "/health":
                return await _respond(send, Reply(200, "OK"))
            if path.startswith("/stream/"):
                return await self._stream_endpoint(scope, receive, send)
        if kind == "websocket" and (self.django_app is None or scope["path"].startswith("/stream/")):
            # Streams are SSE, not WebSocket: refused before the handshake
            # (the server answers 403). Other paths go to the wrapped app
            # (which may speak WebSocket, e.g. Channels).
            return await send({"type": "websocket.close", "code": 1008})
        if self.django_app is None:
            return await _respond(send, Reply(404, f"Not found: {scope.get('path', '')}\n"))
        return await self.django_app(scope, receive, send)

    # -- lifespan ---------------------------------------------------------------

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.node = self.node_factory()
                    await self.node.start()
                except Exception as exc:
                    logger.exception("Streaming node failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def shutdown(self):
        if self.node is not None:
            await self.node.stop()

    # -- /stream/... -----------------------------------------------------------------

    async def _stream_endpoint(self, scope, receive, send):
        opened = await self.open_stream(
            scope["method"], scope["path"], scope.get("query_string", b""), scope["headers"]
        )
        if isinstance(opened, Reply):
            return await _respond(send, opened)
        await self._stream(scope, receive, send, *opened)

    async def open_stream(self, method: str, path: str, query_string: bytes, headers) -> "Reply | tuple":
        """Answer a request for a stream: a ``Reply`` (an error, the JSON status,
        204), or ``(key, after)`` to start streaming. Shared by the ASGI path
        and server.py's direct socket path."""
        if method != "GET":
            return Reply(405, f"Method {method} not allowed; use GET\n", headers=((b"allow", b"GET"),))
        if self.node is None:
            return Reply(503, "Streaming node is not running\n")
        headers = dict(headers)
        wants_status = b"application/json" in headers.get(b"accept", b"")
        try:
            model, pk, after = _parse(path, query_string, headers)
            # A status is read fresh; a stream can share a lookup in flight.
            task = await (model.objects.filter(pk=pk).afirst() if wants_status else self._find(model, pk))
            if task is None:
                raise NotFound(f"{model.stream_name()} {pk} not found\n")
        except (BadRequest, NotFound) as exc:
            return Reply(exc.status, str(exc))
        if wants_status:
            return await self._status(task)
        key = TaskKey.of(model, task.pk)
        if after is not None and task.is_finished:
            last = await sync_to_async(store.last_event)(key)
            if last is not None and last.seq <= after:
                # The client has seen the end; 204 tells an EventSource to stop reconnecting.
                return Reply(204, "")
        return key, after

    async def _find(self, model, pk):
        """The task's row. Requests for a row arriving together (a thousand
        watchers of one task) share one query instead of queueing a thousand
        on the ORM thread; only a found row is shared, so a request never gets
        a 404 from a query that started before the row was committed."""
        lookup = self._lookups.get((model, pk))
        if lookup is not None:
            task = await asyncio.shield(lookup)
            if task is not None:
                return task
        lookup = asyncio.ensure_future(model.objects.filter(pk=pk).afirst())
        self._lookups[model, pk] = lookup

        def forget(_):
            if self._lookups.get((model, pk)) is lookup:
                del self._lookups[model, pk]

        lookup.add_done_callback(forget)
        return await asyncio.shield(lookup)

    async def _status(self, task) -> "Reply":
        last = await sync_to_async(store.last_event)(TaskKey.of(task))
        body = {
            "id": task.pk,
            "model": type(task).stream_name(),
            "status": task.status,
            "attempts": task.attempts,
            "final_value": task.final_value,
            "error": task.error,
            "created_at": _iso(task.created_at),
            "started_at": _iso(task.started_at),
            "completed_at": _iso(task.completed_at),
            "last_event_id": last.seq if last else None,
            "stream": task.get_stream_path(),
        }
        return Reply(200, json.dumps(body), content_type=b"application/json")

    async def _stream(self, scope, receive, send, key, after):
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        streaming = asyncio.current_task()
        disconnected = False

        async def watch_disconnect():
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            streaming.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        send_timeout = self.node.settings.CLIENT_SEND_TIMEOUT
        try:
            async with contextlib.aclosing(self.node.hub.subscribe(key, after)) as chunks:
                async for chunk in chunks:
                    try:
                        async with asyncio.timeout(send_timeout):
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    except TimeoutError:
                        logger.info("Disconnecting %s: it read nothing for %ss", key, send_timeout)
                        abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
                        if abort:
                            abort()
                            await asyncio.sleep(0)  # let the server see the connection go
                        return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:
                raise
            streaming.uncancel()
        finally:
            watcher.cancel()


def _parse(path: str, query_string: bytes, headers: dict):
    match = STREAM_PATH.match(path)
    if not match:
        raise NotFound("Not found: use /stream/<Model>/<id> or /stream/<app_label>/<Model>/<id>\n")
    try:
        model = resolve_model(match["model"], match["app"])
    except UnknownModel as exc:
        raise NotFound(f"{exc}\n") from None
    raw_pk = match["pk"]
    try:
        pk = model._meta.pk.to_python(raw_pk)
    except ValidationError:
        raise BadRequest(f"Malformed task id {raw_pk!r} for {model.stream_name()}\n") from None
    query = parse_qs(query_string.decode("latin-1"))
    after = None
    raw_after = headers.get(b"last-event-id", b"").decode("latin-1").strip()
    raw_after = raw_after or (query.get("last_event_id") or [""])[0]
    if raw_after:
        if not (raw_after.isascii() and raw_after.isdigit() and len(raw_after) <= 18):
            raise BadRequest(f"Malformed Last-Event-ID {raw_after!r}: expected a non-negative integer\n")
        after = int(raw_after)
    history = (query.get("history") or [""])[0]
    if history:
        if history not in ("all", "1", "true"):
            raise BadRequest(f"Unknown history value {history!r}: use history=all\n")
        after = 0 if after is None else after
    return model, pk, after


def _iso(value):
    return value.isoformat() if value else None


async def _respond(send, reply: Reply):
    await send({"type": "http.response.start", "status": reply.status, "headers": reply_headers(reply)})
    await send({"type": "http.response.body", "body": reply.body.encode()})


def reply_headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    if reply.status == 204:  # no body, so no content headers
        return list(reply.headers)
    length = str(len(reply.body.encode())).encode()
    return [(b"content-type", reply.content_type), (b"content-length", length), *reply.headers]
