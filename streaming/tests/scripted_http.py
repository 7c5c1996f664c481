"""A small HTTP server that answers each request with the next of a list of
scripts, over real sockets: for the client's failure modes that a real
server does not produce on demand (drops mid-event, ``retry:`` values, 5xx,
garbage, a reset)."""

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .support import wait_for


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    arrived: float


class Close:
    """End the response: close the socket (a drop, when the task has not ended)."""


class Reset:
    """End the response with a TCP reset (SO_LINGER 0)."""


class Shutdown:
    """Stop listening (later connections are refused), then close this one."""


@dataclass
class Pause:
    seconds: float


@dataclass
class WaitFor:
    """Hold the response until the test sets ``event``."""

    event: threading.Event = field(default_factory=threading.Event)


Step = bytes | Close | Reset | Shutdown | Pause | WaitFor
Script = list[Step]


def stream_head(extra: str = "") -> bytes:
    """A 200 event-stream head whose body ends with the connection, as runserver_stream sends it."""
    return f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n{extra}\r\n".encode()


def chunked_head() -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse(event_type: str, event_id: int | None, data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    id_line = f"id: {event_id}\n" if event_id is not None else ""
    return f"event: {event_type}\ndata: {text}\n{id_line}\n".encode()


def reply(status: int, body: str = "", *, content_type: str = "text/plain", headers: str = "") -> Script:
    reasons = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
               404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
               502: "Bad Gateway", 503: "Service Unavailable"}  # fmt: skip
    encoded = body.encode()
    head = f"HTTP/1.1 {status} {reasons.get(status, 'Status')}\r\n{headers}"
    if status != 204:
        head += f"content-type: {content_type}\r\ncontent-length: {len(encoded)}\r\n"
    return [(head + "connection: close\r\n\r\n").encode() + encoded, Close()]


def status_reply(**fields: Any) -> Script:
    """A task's JSON status, as ``Accept: application/json`` gets it."""
    body = {"id": 1, "model": "ScriptedTask", "final_value": None, "error": None, **fields}
    return reply(200, json.dumps(body), content_type="application/json")


def stream(*events: bytes, end: Step | None = None) -> Script:
    """An event stream of ``events`` that then closes (or ends with ``end``)."""
    return [stream_head(), *events, end or Close()]


class ScriptedServer:
    """Answers the n-th request with the n-th script; records every request.

    A request beyond the scripts gets a 500 (and counts), so a client that
    asks more often than a test expects shows up in ``requests``.
    """

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._threads: list[threading.Thread] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/stream/ScriptedTask/1") -> str:
        return self.base_url + path

    def __enter__(self) -> "ScriptedServer":
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._sock.close()

    def wait_requests(self, count: int, timeout: float = 10.0) -> list[Request]:
        wait_for(lambda: len(self.requests) >= count, timeout=timeout, message=f"{count} requests")
        return self.requests

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            with self._lock:
                self.requests.append(Request(method, path, headers, time.monotonic()))
                script = self.scripts.pop(0) if self.scripts else reply(500, "no more scripts\n")
            for step in script:
                try:
                    if isinstance(step, bytes):
                        conn.sendall(step)
                    elif isinstance(step, Pause):
                        time.sleep(step.seconds)
                    elif isinstance(step, WaitFor):
                        step.event.wait(30)
                    elif isinstance(step, Reset):
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    elif isinstance(step, Shutdown):
                        self.__exit__()
                        conn.shutdown(socket.SHUT_RDWR)
                        return
                    elif isinstance(step, Close):
                        conn.shutdown(socket.SHUT_RDWR)
                        return
                except OSError:  # the client left first
                    return
