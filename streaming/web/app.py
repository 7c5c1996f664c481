"""The ASGI app: SSE streams, /health, and Django for every other path.

Streaming requests never enter Django's request machinery: a stream is a
cursor on the broker plus the connection's send loop. Django still serves
the admin and everything else on the same port.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import sys
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.core.handlers.asgi import ASGIHandler
from django.http.request import split_domain_port, validate_host

from .. import access
from ..conf import StreamingSettings
from ..events import ERROR, Event, notice
from ..fanout.mux import MAX_FEED_START, Mux
from ..fanout.sinks import QueueSink, Sink
from ..keys import TaskKey
from ..models import Status
from ..node import Node
from ..tasks import store
from ..tasks.registry import UnknownModel, resolve_model
from .assets import Assets
from .cors import PREFLIGHT_HEADERS, Cors, CrossOrigin
from .limits import RETRY_AFTER, StreamLimits, client_address
from .metrics import PATH as METRICS_PATH
from .metrics import Metrics

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser

    from ..asgi import ASGIApp, Receive, Send  # at run time asgi imports this module
    from ..models import StreamTask

logger = logging.getLogger(__name__)
host_logger = logging.getLogger("django.security.DisallowedHost")  # where Django reports them

STREAM_PATH = re.compile(r"^/stream/(?:(?P<app>[^/]+)/)?(?P<model>[^/]+)/(?P<pk>[^/]+)/?$")
MUX_PATH = "/stream/"  # the multiplexed stream: ?task=<Model>/<id>[@<after>]&feed=<Model>
MUX_TASK = re.compile(r"^(?:(?P<app>[^/@]+)/)?(?P<model>[^/@]+)/(?P<pk>[^/]+?)(?:@(?P<after>[0-9]{1,18}))?$")
MUX_FEED = re.compile(r"^(?:(?P<app>[^/]+)/)?(?P<model>[^/]+)$")
MAX_MUX_TASKS = 100  # task= per multiplexed stream
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]
# uvicorn's protocol (server/protocol.py) puts the transport's abort here so a
# stalled client can be cut off at once instead of waiting on its buffer.
ABORT_EXTENSION = "streaming.abort"


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete (non-stream) response to a stream request."""

    status: int
    body: str
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple[tuple[bytes, bytes], ...] = ()


# Every StreamingApp built in this process, for runserver_stream to find the
# one inside an ASGI_APPLICATION that wraps it (middleware, a router).
built: "weakref.WeakSet[StreamingApp]" = weakref.WeakSet()


def _admitted_by_nobody() -> None:
    pass


class Opened(NamedTuple):
    """A stream request that may stream: task ``key`` from after ``after``,
    until ``expires_at`` (Unix time; the token's expiry, None: no limit).
    The caller calls ``release`` once when the stream ends (its place under
    the limits) and adds ``headers`` to the response head (CORS)."""

    key: TaskKey
    after: int | None
    expires_at: float | None = None
    release: Callable[[], None] = _admitted_by_nobody
    headers: tuple[tuple[bytes, bytes], ...] = ()


class OpenedMany(NamedTuple):
    """A multiplexed stream request that may stream: ``targets`` (each task's
    key and where it starts) and the models of ``feeds``; the rest as ``Opened``."""

    targets: tuple[tuple[TaskKey, int | None], ...]
    feeds: "tuple[type[StreamTask], ...]"
    expires_at: float | None = None
    release: Callable[[], None] = _admitted_by_nobody
    headers: tuple[tuple[bytes, bytes], ...] = ()


class BadRequest(Exception):
    status = 400


class NotFound(Exception):
    status = 404


class Forbidden(Exception):
    status = 403


def forbidden(model: "type[StreamTask]", pk: object) -> Forbidden:
    # The same answer whether or not the row exists: ids reveal nothing.
    return Forbidden(
        f"Not allowed to watch {model.stream_name()} {pk}: sign in as a user who may, or use a stream token\n"
    )


def feed_forbidden(model: "type[StreamTask]") -> Forbidden:
    return Forbidden(
        f"Not allowed to follow every {model.stream_name()}: "
        "sign in as a user who may, or use a stream token\n"
    )


def access_expired(expires_at: float) -> bytes:
    """The last event of a stream whose token ran out (no id: resuming is not disturbed)."""
    when = datetime.fromtimestamp(expires_at, UTC).isoformat()
    return notice("access_expired", {"message": "Stream token expired", "expired_at": when})


class StreamingApp:
    """The ASGI app: ``/stream/...`` and ``/health`` here, everything else to ``django_app``.

    ``django_app`` is whatever the project serves otherwise: Django's
    ASGIHandler, or the project's own ASGI app (a Channels router, an app
    wrapped in middleware); it gets no lifespan events.

    The node (runner, hub, transport) starts with the ASGI lifespan, or,
    under a server that sends none (daphne), with the first request of any
    kind, a health check included. ``start()`` is idempotent, so a server
    that starts the node itself (runserver_stream) and a lifespan that also
    arrives are both fine.
    """

    def __init__(
        self, django_app: "ASGIApp | None" = None, *, node_factory: Callable[[], Node] = Node
    ) -> None:
        self.django_app = django_app
        self.node_factory = node_factory
        self.node: Node | None = None
        self._lookups: dict[tuple[type[StreamTask], object], asyncio.Future[StreamTask | None]] = {}
        self._guards: tuple[Cors, StreamLimits] | None = None  # from the node's settings
        self._ready_check: asyncio.Future[str | None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._assets = Assets()
        self._starting: asyncio.Future[Node] | None = None
        self._closed = False  # shut down: no request starts the node again
        self._lifespan_seen = False
        self.metrics: Metrics | None = None  # STREAMING['METRICS'] on: /metrics
        built.add(self)

    async def __call__(self, scope: dict[str, Any], receive: "Receive", send: "Send") -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        if self.node is None and not self._closed:
            try:
                await self.start(by_request=True)  # no lifespan came (daphne): the first request starts it
            except Exception:
                if kind == "http":
                    return await _respond(send, Reply(503, "Streaming node failed to start\n"))
                raise
        if kind == "http":
            path = scope["path"]
            if path == "/health":  # liveness: the process serves
                return await _respond(send, Reply(200, "OK"))
            if path == "/ready":  # readiness: it can reach what it needs to serve and run tasks
                return await _respond(send, await self._readiness())
            if path == METRICS_PATH and self.metrics is not None:  # else the project's, if any
                answer = await self.metrics.answer(scope["method"], scope["headers"])
                return await _respond(send, Reply(*answer))
            if path.startswith("/stream/") or path == "/stream":
                return await self._stream_endpoint(scope, receive, send)
            asset = self._assets.find(path) if scope["method"] in ("GET", "HEAD") else None
            if asset is not None:
                content_type, body = asset
                return await _respond(send, Reply(200, body.decode(), content_type=content_type))
        if kind == "websocket" and (
            self.django_app is None
            or scope["path"].startswith("/stream/")
            or isinstance(self.django_app, ASGIHandler)  # Django's own speaks HTTP only (a 500 otherwise)
        ):
            # Streams are SSE, not WebSocket: refused before the handshake
            # (the server answers 403). Other paths go to the wrapped app
            # when it may speak WebSocket (Channels).
            return await send({"type": "websocket.close", "code": 1008})
        if self.django_app is None:
            return await _respond(send, Reply(404, f"Not found: {scope.get('path', '')}\n"))
        return await self.django_app(scope, receive, send)

    # -- the node's life ------------------------------------------------------------

    async def start(self, *, by_request: bool = False) -> Node:
        """Start the node once; concurrent callers share the start, a failed one is tried again."""
        if self.node is not None:
            return self.node
        if self._closed:
            raise RuntimeError("The streaming app was shut down")
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_node(by_request))
        starting = self._starting
        try:
            return await asyncio.shield(starting)
        finally:
            if starting.done() and (starting.cancelled() or starting.exception() is not None):
                self._starting = None  # the next request tries again

    async def _start_node(self, by_request: bool) -> Node:
        try:
            node = self.node_factory()
            self._build_guards(node.settings)  # a bad CORS or limit setting fails the start, not a request
            await node.start()
        except Exception:
            logger.exception("Streaming node failed to start")
            raise
        self.node = node
        try:
            if node.settings.METRICS:
                self.metrics = Metrics(self, node)
            warn_about_topology(node)
            stopped_with_twisted = not self._lifespan_seen and _stop_with_twisted(self)
            if by_request and not self._lifespan_seen and not stopped_with_twisted:
                logger.warning(
                    "The streaming node started with a request: the ASGI lifespan did not reach "
                    "the streaming app (a router or middleware around it refused or dropped it). "
                    "A server stop will not give running tasks SHUTDOWN_GRACE or hand them back; "
                    "they are recovered by their policy as after a crash. Make "
                    "get_asgi_application(app=your_app) the outermost app."
                )
        except Exception:
            logger.exception("Streaming node: a start-up step failed (the node runs)")
        return node

    async def _lifespan(self, receive: "Receive", send: "Send") -> None:
        self._lifespan_seen = True
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def shutdown(self) -> None:
        """Stop the node (once; callers share the stop). No request starts it again."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._starting)
        if self.node is not None:
            await self.node.stop()
        if self.metrics is not None:
            await self.metrics.stop()

    @property
    def stream_limits(self) -> StreamLimits | None:
        """This process's stream limits and counts (once the node started)."""
        return self._guards[1] if self._guards else None

    async def _readiness(self) -> Reply:
        """200 READY, or 503 saying what this node cannot reach. Probes arriving
        together (a load balancer's, many) share one check."""
        if self.node is None:
            return Reply(503, "Not ready: the streaming node is not running\n")
        if self._ready_check is None or self._ready_check.done():
            self._ready_check = asyncio.ensure_future(self.node.readiness())
        problem = await asyncio.shield(self._ready_check)
        if problem is None:
            return Reply(200, "READY")
        return Reply(503, f"Not ready: {problem}\n")

    def hurry(self) -> None:
        """A second stop signal: running tasks are interrupted now instead of after the grace."""
        if self.node is not None:
            self.node.hurry()

    # -- /stream/... -----------------------------------------------------------------

    async def _stream_endpoint(self, scope: dict[str, Any], receive: "Receive", send: "Send") -> None:
        client = scope.get("client")
        opened = await self.open_stream(
            scope["method"],
            scope["path"],
            scope.get("query_string", b""),
            scope["headers"],
            client=client[0] if client else None,
        )
        if isinstance(opened, Reply):
            return await _respond(send, opened)
        try:
            await self._stream(scope, receive, send, opened)
        finally:
            opened.release()

    async def open_stream(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        *,
        client: str | None = None,
    ) -> "Reply | Opened | OpenedMany":
        """Answer a request for a stream: a ``Reply`` (an error, the JSON status,
        204), or ``Opened`` (``OpenedMany``: the multiplexed stream) to start
        streaming. Shared by the ASGI path and server/protocol.py's direct
        socket path, so both decide alike: the Host header (ALLOWED_HOSTS),
        the page's origin (CORS), who may watch (streaming/access.py) and the
        limits (``client``: the peer's address), once, here; nothing is
        checked per event."""
        header_map = dict(headers)
        host = _request_host(header_map)
        if not _host_allowed(host):
            return Reply(400, "Invalid Host header\n")
        if self.node is None:
            return Reply(503, "Streaming node is not running\n")
        cors, limits = self._guards or self._build_guards(self.node.settings)
        cross_origin: CrossOrigin | None = None
        origin = header_map.get(b"origin")
        if origin is not None:
            checked = cors.check(origin, host)
            if isinstance(checked, str):
                return Reply(403, checked)
            cross_origin = checked
        cors_headers = cross_origin.headers if cross_origin else ()
        if method == "OPTIONS":
            preflight = cross_origin is not None and b"access-control-request-method" in header_map
            allow = PREFLIGHT_HEADERS if preflight else ((b"allow", b"GET, OPTIONS"),)
            return Reply(204, "", headers=cors_headers + allow)
        answer = await self._answer(
            method,
            path,
            query_string,
            header_map,
            cookies=cross_origin is None or cross_origin.credentials,
            client=client_address(client, header_map, limits.trusted_proxies),
            limits=limits,
        )
        if not cors_headers:
            return answer
        if isinstance(answer, Opened | OpenedMany):
            return answer._replace(headers=cors_headers)
        return dataclasses.replace(answer, headers=answer.headers + cors_headers)

    def _build_guards(self, settings: StreamingSettings) -> tuple[Cors, StreamLimits]:
        self._guards = Cors(settings), StreamLimits(settings)
        return self._guards

    async def _answer(
        self,
        method: str,
        path: str,
        query_string: bytes,
        header_map: dict[bytes, bytes],
        *,
        cookies: bool,
        client: str | None,
        limits: StreamLimits,
    ) -> "Reply | Opened | OpenedMany":
        if method != "GET":
            allow = ((b"allow", b"GET, OPTIONS"),)
            return Reply(405, f"Method {method} not allowed; use GET\n", headers=allow)
        if path == MUX_PATH:
            return await self._answer_many(
                query_string, header_map, cookies=cookies, client=client, limits=limits
            )
        wants_status = b"application/json" in header_map.get(b"accept", b"")
        expires_at: float | None = None
        try:
            model, pk, after, query = _parse(path, query_string, header_map)
            user = None
            if not model.public_stream:
                # Decided before the row is read: a request that proves nothing
                # learns nothing (403 whether or not the task exists).
                grant = _grant(query, header_map)
                if grant is not None:
                    if TaskKey.of(model, pk) not in grant.keys:
                        raise forbidden(model, pk)
                    expires_at = grant.expires_at
                else:
                    user = await _session_user(header_map, cookies)
                    if user is None:
                        raise forbidden(model, pk)
            # A status is read fresh; a stream can share a lookup in flight.
            task = await (model.objects.filter(pk=pk).afirst() if wants_status else self._find(model, pk))
            if user is not None and (task is None or not await task.ahas_stream_permission(user)):
                # The hook decides per row: a row that does not exist is granted to nobody.
                raise forbidden(model, pk)
            if task is None:
                raise NotFound(f"{model.stream_name()} {pk} not found\n")
        except (BadRequest, NotFound, Forbidden, access.InvalidToken) as exc:
            return _refusal(exc)
        if wants_status:
            return await self._status(task)
        key = TaskKey.of(model, task.pk)
        if after is not None and task.is_finished:
            last = await sync_to_async(store.last_event)(key)
            if last is not None and last.seq <= after:
                # The client has seen the end; 204 tells an EventSource to stop reconnecting.
                return Reply(204, "")
        admitted = limits.admit(key, client)
        if isinstance(admitted, str):
            return _busy(admitted)
        return Opened(key, after, expires_at, admitted)

    async def _answer_many(
        self,
        query_string: bytes,
        header_map: dict[bytes, bytes],
        *,
        cookies: bool,
        client: str | None,
        limits: StreamLimits,
    ) -> "Reply | OpenedMany":
        """The multiplexed stream: every task checked as its own stream would be,
        one refusal refuses the request."""
        try:
            query = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
            history_all = _history_all(query)
            wanted: dict[TaskKey, tuple[type[StreamTask], object, int | None]] = {}
            for value in query.get("task", []):
                model, pk, after = _parse_target(value)
                if after is None and history_all:
                    after = 0
                wanted.setdefault(TaskKey.of(model, pk), (model, pk, after))
            feeds = {_parse_feed(value) for value in query.get("feed", [])}
            if not wanted and not feeds:
                raise BadRequest(
                    "Name the tasks to stream: /stream/?task=<Model>/<id>[@<last event id>]&task=... "
                    "and/or feed=<Model> (every task of a model that runs)\n"
                )
            if len(wanted) > MAX_MUX_TASKS:
                raise BadRequest(f"Too many tasks: at most {MAX_MUX_TASKS} task= per stream\n")
            user = None
            expires_at: float | None = None
            # A task of a model whose feed the request opens is the feed's to
            # grant: clients resume a feed naming the tasks it brought them.
            guarded = [
                key for key, (model, _, _) in wanted.items() if not model.public_stream and model not in feeds
            ]
            guarded_feeds = [model for model in feeds if not model.public_stream]
            if guarded or guarded_feeds:
                grant = _grant(query, header_map)
                if grant is not None:
                    for key in guarded:
                        if key not in grant.keys:
                            model, pk, _ = wanted[key]
                            raise forbidden(model, pk)
                    for model in guarded_feeds:
                        if access.feed_key(model) not in grant.keys:
                            raise feed_forbidden(model)
                    expires_at = grant.expires_at
                else:
                    user = await _session_user(header_map, cookies)
                    if user is None:
                        if guarded:
                            model, pk, _ = wanted[guarded[0]]
                            raise forbidden(model, pk)
                        raise feed_forbidden(guarded_feeds[0])
                    for model in guarded_feeds:
                        if not await sync_to_async(model.has_feed_permission)(user):
                            raise feed_forbidden(model)
            rows = await _rows(wanted.values())
            for key, (model, pk, _) in wanted.items():
                task = rows.get(key)
                if (
                    user is not None
                    and not model.public_stream
                    and model not in feeds
                    and (task is None or not await task.ahas_stream_permission(user))
                ):
                    raise forbidden(model, pk)
                if task is None:
                    raise NotFound(f"{model.stream_name()} {pk} not found\n")
        except (BadRequest, NotFound, Forbidden, access.InvalidToken) as exc:
            return _refusal(exc)
        targets = tuple((key, after) for key, (_, _, after) in wanted.items())
        if not feeds and all(after is not None and rows[key].is_finished for key, after in targets):
            lasts = await sync_to_async(lambda: [store.last_event(key) for key, _ in targets])()
            seen = [
                last is not None and after is not None and last.seq <= after
                for last, (_, after) in zip(lasts, targets, strict=True)
            ]
            if all(seen):
                return Reply(204, "")  # every task had ended before the client's cursors
        admitted = limits.admit(tuple(wanted), client)
        if isinstance(admitted, str):
            return _busy(admitted)
        return OpenedMany(targets, tuple(feeds), expires_at, admitted)

    def attach_many(self, opened: OpenedMany, sink: Sink) -> Mux:
        """Start a multiplexed stream into ``sink`` (both HTTP paths); the caller
        calls ``close()`` on the result when the client goes away."""
        assert self.node is not None  # open_stream() admitted it: the node runs
        hub = self.node.hub
        expires_at = opened.expires_at
        mux = Mux(
            hub,
            sink,
            feeds=frozenset(TaskKey.of(model, "").label for model in opened.feeds),
            ends_in=None if expires_at is None else expires_at - time.time(),
        )
        if expires_at is not None:
            mux.expire_with(access_expired(expires_at))
        # Followed before the running tasks are read: a task that starts in
        # between is announced, not missed (adding one twice is a no-op).
        hub.follow(mux)
        for key, after in opened.targets:
            mux.add(key, after)
        if opened.feeds:
            adding = asyncio.ensure_future(_add_running(mux, opened.feeds))
            self._background.add(adding)
            adding.add_done_callback(self._background.discard)
        return mux

    async def _find(self, model: "type[StreamTask]", pk: object) -> "StreamTask | None":
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

        def forget(_: object) -> None:
            if self._lookups.get((model, pk)) is lookup:
                del self._lookups[model, pk]

        lookup.add_done_callback(forget)
        return await asyncio.shield(lookup)

    async def _status(self, task: "StreamTask") -> "Reply":
        last = await sync_to_async(store.last_event)(TaskKey.of(task))
        body = {
            "id": task.pk,
            "model": type(task).stream_name(),
            "status": task.status,
            "attempts": task.attempts,
            "final_value": task.final_value,
            "error": _error(task, last),
            "created_at": _iso(task.created_at),
            "started_at": _iso(task.started_at),
            "completed_at": _iso(task.completed_at),
            "last_event_id": last.seq if last else None,
            "stream": task.get_stream_path(),
        }
        return Reply(200, json.dumps(body), content_type=b"application/json")

    def _chunks(self, opened: "Opened | OpenedMany") -> AsyncGenerator[bytes, None]:
        assert self.node is not None  # open_stream() admitted it: the node runs (and is never unset)
        if isinstance(opened, OpenedMany):
            return self._chunks_of_many(opened)
        expires_at = opened.expires_at
        ends_in, last = (
            (None, b"") if expires_at is None else (expires_at - time.time(), access_expired(expires_at))
        )
        return self.node.hub.subscribe(opened.key, opened.after, ends_in=ends_in, last=last)

    async def _chunks_of_many(self, opened: OpenedMany) -> AsyncGenerator[bytes, None]:
        sink = QueueSink()
        mux = self.attach_many(opened, sink)
        try:
            async for chunk in sink.consume():
                yield chunk
        finally:
            mux.close()

    async def _stream(
        self, scope: dict[str, Any], receive: "Receive", send: "Send", opened: "Opened | OpenedMany"
    ) -> None:
        assert self.node is not None  # open_stream() admitted it: the node runs (and is never unset)
        headers = [*SSE_HEADERS, *opened.headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        streaming = asyncio.current_task()
        assert streaming is not None  # a coroutine the server runs in a task
        disconnected = False

        async def watch_disconnect() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            streaming.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        send_timeout = self.node.settings.CLIENT_SEND_TIMEOUT
        try:
            async with contextlib.aclosing(self._chunks(opened)) as chunks:
                async for chunk in chunks:
                    try:
                        async with asyncio.timeout(send_timeout):
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    except TimeoutError:
                        logger.info("Disconnecting a stream client: it read nothing for %ss", send_timeout)
                        self.node.hub.cut_off += 1
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


def _request_host(headers: dict[bytes, bytes]) -> bytes | None:
    """The host a request was sent to: the Host header, or X-Forwarded-Host
    with USE_X_FORWARDED_HOST (as ``HttpRequest.get_host``)."""
    if django_settings.USE_X_FORWARDED_HOST and b"x-forwarded-host" in headers:
        return headers[b"x-forwarded-host"]
    return headers.get(b"host")


def _host_allowed(raw: bytes | None) -> bool:
    """Django's ALLOWED_HOSTS rule for the request's host, DEBUG's localhost
    defaults when ALLOWED_HOSTS is empty. A request without a Host header
    (HTTP/1.0) passes only ``"*"``, as Django's own would (its server name is
    unknown)."""
    allowed = django_settings.ALLOWED_HOSTS
    if raw is None:
        return "*" in allowed
    host = raw.decode("latin-1")
    if django_settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    domain, _port = split_domain_port(host)
    if domain and validate_host(domain, allowed):
        return True
    host_logger.warning(
        "Invalid HTTP_HOST header for a stream: %r. You may need to add it to ALLOWED_HOSTS.", host
    )
    return False


def _error(task: "StreamTask", last: Event | None) -> dict[str, str] | None:
    """A failed task's error for clients: its type and message, as its ``error``
    event says; never the traceback (that stays in the row, for the admin)."""
    if task.status != Status.FAILED:
        return None
    if last is not None and last.type == ERROR:
        data = last.data()
        return {"type": str(data.get("type", "")), "message": str(data.get("message", ""))}
    return {"type": "Error", "message": "The task failed"}


def _parse(
    path: str, query_string: bytes, headers: dict[bytes, bytes]
) -> "tuple[type[StreamTask], object, int | None, dict[str, list[str]]]":
    match = STREAM_PATH.match(path)
    if not match:
        raise NotFound(
            "Not found: use /stream/<Model>/<id>, /stream/<app_label>/<Model>/<id>, "
            "or /stream/?task=<Model>/<id>&task=... for several\n"
        )
    model = _resolve(match["app"], match["model"])
    pk = _to_pk(model, match["pk"])
    query = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)  # "?token=" is a token
    after = None
    raw_after = headers.get(b"last-event-id", b"").decode("latin-1").strip()
    raw_after = raw_after or (query.get("last_event_id") or [""])[0]
    if raw_after:
        if not (raw_after.isascii() and raw_after.isdigit() and len(raw_after) <= 18):
            raise BadRequest(
                f"Malformed Last-Event-ID {raw_after!r}: "
                "expected a non-negative integer of at most 18 digits\n"
            )
        after = int(raw_after)
    if _history_all(query):
        after = 0 if after is None else after
    return model, pk, after, query


def _grant(query: dict[str, list[str]], headers: dict[bytes, bytes]) -> "access.Grant | None":
    """The grant of the request's stream token (None: it has none); raises
    InvalidToken or TokenExpired (401) and BadRequest (a token sent twice)."""
    try:
        token = access.request_token(query, headers)
    except ValueError as exc:
        raise BadRequest(f"{exc}\n") from None
    return None if token is None else access.read_token(token)


async def _session_user(headers: dict[bytes, bytes], cookies: bool) -> "AbstractBaseUser | None":
    """The user of the request's session cookie. A page of another origin
    streams with its cookies only where CORS_ALLOW_CREDENTIALS says so
    (``cookies``)."""
    session = access.session_key(headers) if cookies else None
    return await sync_to_async(access.session_user)(session) if session else None


def _refusal(exc: Exception) -> Reply:
    if isinstance(exc, access.InvalidToken):
        challenge = f'Bearer error="invalid_token", error_description="{exc}"'.encode()
        return Reply(401, f"{exc}\n", headers=((b"www-authenticate", challenge),))
    assert isinstance(exc, BadRequest | NotFound | Forbidden)
    return Reply(exc.status, str(exc))


def _busy(reason: str) -> Reply:
    """A stream refused at one of the limits: come back later."""
    return Reply(503, f"{reason}; retry later\n", headers=((b"retry-after", str(RETRY_AFTER).encode()),))


def _history_all(query: dict[str, list[str]]) -> bool:
    history = (query.get("history") or [""])[0]
    if history and history not in ("all", "1", "true"):
        raise BadRequest(f"Unknown history value {history!r}: use history=all\n")
    return bool(history)


def _resolve(app: str | None, name: str) -> "type[StreamTask]":
    try:
        return resolve_model(name, app)
    except UnknownModel as exc:
        raise NotFound(f"{exc}\n") from None


def _to_pk(model: "type[StreamTask]", raw_pk: str) -> object:
    try:
        return model._meta.pk.to_python(raw_pk)
    except ValidationError:
        raise BadRequest(f"Malformed task id {raw_pk!r} for {model.stream_name()}\n") from None


def _parse_target(value: str) -> "tuple[type[StreamTask], object, int | None]":
    """``task=<Model>/<id>[@<after>]`` (or ``<app_label>/<Model>/<id>...``)."""
    match = MUX_TASK.match(value)
    if not match:
        raise BadRequest(f"Malformed task={value!r}: expected <Model>/<id> or <Model>/<id>@<last event id>\n")
    if "@" in match["pk"]:
        cursor = match["pk"].rpartition("@")[2]
        raise BadRequest(
            f"Malformed cursor {cursor!r} in task={value!r}: expected <Model>/<id>@<non-negative integer>\n"
        )
    model = _resolve(match["app"], match["model"])
    after = match["after"]
    return model, _to_pk(model, match["pk"]), None if after is None else int(after)


def _parse_feed(value: str) -> "type[StreamTask]":
    match = MUX_FEED.match(value)
    if not match:
        raise BadRequest(f"Malformed feed={value!r}: expected <Model> or <app_label>/<Model>\n")
    return _resolve(match["app"], match["model"])


async def _rows(
    wanted: "Iterable[tuple[type[StreamTask], object, int | None]]",
) -> "dict[TaskKey, StreamTask]":
    """The rows of the tasks named, one query per model."""
    by_model: dict[type[StreamTask], list[object]] = {}
    for model, pk, _ in wanted:
        by_model.setdefault(model, []).append(pk)
    rows: dict[TaskKey, StreamTask] = {}
    for model, pks in by_model.items():
        async for task in model.objects.filter(pk__in=pks):
            rows[TaskKey.of(task)] = task
    return rows


async def _add_running(mux: Mux, models: "Iterable[type[StreamTask]]") -> None:
    """A feed starts with its models' running tasks (the most recently started)."""
    try:
        for model in models:
            for task in await sync_to_async(store.running_tasks)(model, MAX_FEED_START):
                mux.rejoin(task)
    except Exception:
        logger.exception("Reading the running tasks of a feed failed")
        mux.end()  # the client reconnects and the read is tried again


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


async def _respond(send: "Send", reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply_headers(reply)})
    await send({"type": "http.response.body", "body": reply.body.encode()})


def reply_headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    if reply.status == 204:  # no body, so no content headers
        return list(reply.headers)
    length = str(len(reply.body.encode())).encode()
    return [
        (b"content-type", reply.content_type),
        (b"content-length", length),
        # A task's status (or whether one may see it) is for this request only:
        # no cache between server and client keeps it for another.
        (b"cache-control", b"no-store"),
        *reply.headers,
    ]


def warn_about_topology(node: Node) -> None:
    """Say so at start when this process cannot see what the others do."""
    from ..checks import several_processes

    if node.transport.shared:
        return
    reason = several_processes()
    if reason:
        logger.warning(
            "This process looks like one of several (%s), but STREAMING['BROKER_URL'] is the "
            "in-memory broker: each process sees only its own tasks' events, so a client can wait "
            "for ever on a task that runs in another process. Use Redis "
            "(STREAMING['BROKER_URL'] = 'redis://host:6379/0') or run one process "
            "(manage.py runserver_stream serves many clients from one process).",
            reason,
        )
    if node.runner is None:
        logger.warning(
            "RUN_TASKS is False with the in-memory broker: this process runs no task and cannot "
            "hear the live events of tasks run elsewhere. Use Redis (STREAMING['BROKER_URL'])."
        )


def _stop_with_twisted(app: StreamingApp) -> bool:
    """Under daphne (Twisted, no ASGI lifespan): stop the node when the reactor shuts down,
    so running tasks get the shutdown grace and are handed back as under runserver_stream."""
    if "twisted.internet.reactor" not in sys.modules:
        return False
    from twisted.internet import defer
    from twisted.internet import reactor as twisted_reactor

    reactor: Any = twisted_reactor  # typed as an interface its stubs do not describe well
    if not reactor.running:
        return False
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.Deferred.fromFuture(asyncio.ensure_future(app.shutdown()))
    )
    return True
