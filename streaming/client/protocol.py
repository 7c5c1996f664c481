"""What the client decides, without any I/O: events, errors, when and how to
reconnect, and a task's outcome. ``sync.py`` and ``aio.py`` do the I/O around
it, so both behave alike by construction.

Nothing here imports Django: the client runs in any Python program.
"""

import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from httpx_sse import ServerSentEvent

TERMINAL_EVENTS = frozenset({"complete", "error", "cancelled"})
# The server's own last word on a stream opened with a stream token that ran out.
ACCESS_EXPIRED = "access_expired"
# The keys the runner adds to every event's data (streaming/events.py RUNNER_KEYS).
RUNNER_KEYS = ("_task_id", "_model", "_timestamp")

DEFAULT_RETRY = 0.5  # seconds before the first reconnect, until the server's ``retry:`` says otherwise
DEFAULT_MAX_DELAY = 30.0  # the longest wait between two reconnects
MAX_RETRY_AFTER = 60.0  # the longest a 503's Retry-After is obeyed for
MAX_MESSAGE = 300  # characters of an error answer's first line kept in the exception
JITTER = 0.5  # each wait is spread over [delay, delay * (1 + JITTER)]
# A stream open this long before it dropped was healthy (the server's
# keep-alive comments arrive every 15 s by default): the count starts again.
HEALTHY_STREAM = 10.0
MAX_TASKS = 100  # task= per multiplexed stream request (the server's limit)
# Client errors that asking again will not change (408 and 429 are worth a retry).
FINAL_STATUSES = frozenset(range(400, 500)) - {408, 429}


@dataclass(frozen=True)
class Event:
    """One event: its type, its id (``None`` if it had none) and its data
    (parsed JSON; the raw text when the data is not JSON)."""

    type: str
    id: str | None
    data: Any

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    @property
    def task(self) -> tuple[str, str] | None:
        """``(model, task id)`` from the data's ``_model`` and ``_task_id``, or None."""
        if isinstance(self.data, dict) and "_model" in self.data and "_task_id" in self.data:
            return str(self.data["_model"]), str(self.data["_task_id"])
        return None


class StreamError(Exception):
    """The stream could not be read to its end."""


class StreamHTTPError(StreamError):
    """The server answered with a status other than 200 or 204."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class StreamConnectError(StreamError):
    """The first connection failed (nothing listens at the URL's host and port)."""


class StreamGaveUp(StreamError):
    """The connection kept failing: ``max_reconnects`` reconnects in a row got nowhere."""

    def __init__(self, reconnects: int, last_problem: str | None) -> None:
        detail = f" (last: {last_problem})" if last_problem else ""
        super().__init__(f"connection lost and {reconnects} reconnects failed{detail}")
        self.last_problem = last_problem


class AccessExpired(StreamError):
    """The stream token ran out mid-stream; the task may still be running.

    Resume with a fresh token from ``last_event_id`` (pass it as the new
    stream's ``last_event_id``): nothing is lost.
    """

    def __init__(self, url: str, last_event_id: str | None, data: Any) -> None:
        when = data.get("expired_at") if isinstance(data, dict) else None
        after = f"after event {last_event_id}" if last_event_id else "from the start"
        super().__init__(
            f"the stream token for {url} expired{f' at {when}' if when else ''}; "
            f"resume {after} with a new token"
        )
        self.url = url
        self.last_event_id = last_event_id
        self.expired_at = when


class TaskError(Exception):
    """The task ended without a value: it failed or was cancelled."""


class TaskFailed(TaskError):
    """The task raised: ``error_type`` (the exception's class name) and ``message``."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}" if error_type else message)
        self.error_type = error_type
        self.message = message


class TaskCancelled(TaskError):
    """The task was cancelled."""

    def __init__(self, message: str = "Task cancelled") -> None:
        super().__init__(message)
        self.message = message


def task_url(base_url: str, model: str, task_id: object) -> str:
    """``<base_url>/stream/<model>/<task_id>``; ``model`` may be ``app_label/Model``."""
    return f"{base_url.rstrip('/')}/stream/{model.strip('/')}/{task_id}"


def reconnect_delay(
    base: float, failures: int, *, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """The wait before reconnect number ``failures`` (1, 2, ...) in a row:
    ``base`` doubled for each failure after the first, at most ``cap``, then
    spread up to half as long again so that clients dropped together (a
    server restart) do not all come back in the same instant, and never past
    ``cap``. Never shorter than ``base``: the server's ``retry:`` is a floor."""
    delay = min(cap, base * 2 ** max(0, failures - 1))
    return min(cap, delay * (1 + JITTER * rand()))


def retry_after(status_code: int, headers: Mapping[str, str]) -> float | None:
    """The seconds a 503 (or 429) asks the client to wait, at most a minute, or None."""
    if status_code not in (429, 503):
        return None
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date: not ours to guess at
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def parse_event(sse: ServerSentEvent) -> Event | None:
    """The event to yield, or None for a message with no data.

    The WHATWG EventSource parser dispatches nothing when a message's data
    buffer is empty, but httpx-sse (up to at least 0.4.3) dispatches an empty
    ``message`` at the blank line after every comment once an ``id:`` was
    seen (its last event id is sticky): each ``: keep-alive`` would become an
    event. httpx-sse cannot tell ``data:`` (one empty line) from no data, so
    both are dropped; our server always sends JSON data.
    """
    if not sse.data:
        return None
    try:
        data = json.loads(sse.data)
    except ValueError:
        data = sse.data
    return Event(sse.event, sse.id or None, data)


Opening = Literal["stream", "ended", "refused"]


class ReadState(Protocol):
    """Where a stream stands: what ``sync.py`` and ``aio.py`` read it with."""

    url: str
    ended: bool
    reconnects: "Reconnects"

    def params(self) -> list[tuple[str, str]]: ...

    def headers(self, token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]: ...

    def receive(self, sse: ServerSentEvent) -> "Event | None": ...

    def no_more_events(self) -> None: ...


class Reconnects:
    """When to reconnect and for how long to wait; when to give up.

    ``failures`` counts reconnects in a row that brought no event; an event
    resets it, and so does a stream that stayed open ``HEALTHY_STREAM``
    seconds (a quiet feed cut by a proxy's connection age is not failing).
    So a long stream survives any number of drops that each make progress,
    while a server that keeps failing is given up on.
    """

    def __init__(
        self,
        url: str,
        *,
        max_reconnects: int | None,
        retry: float,
        max_delay: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.max_reconnects = max_reconnects
        self.base = retry
        self.max_delay = max_delay
        self.rand = rand
        self.failures = 0
        self.connected_once = False
        self.last_problem: str | None = None
        self._stream_opened: float | None = None

    def fresh(self) -> "Reconnects":
        """Another count with the same settings (for a request of its own)."""
        return Reconnects(
            self.url,
            max_reconnects=self.max_reconnects,
            retry=self.base,
            max_delay=self.max_delay,
            rand=self.rand,
        )

    def progressed(self) -> None:
        self.failures = 0

    def set_retry(self, milliseconds: int) -> None:
        """The server's ``retry:`` field: its reconnection time, from now on."""
        self.base = min(max(milliseconds, 0) / 1000, self.max_delay)

    def opened(self, status_code: int) -> Opening:
        if status_code in (200, 204):
            self.connected_once = True
        if status_code == 200:
            self._stream_opened = time.monotonic()
            return "stream"
        if status_code == 204:
            return "ended"
        return "refused"

    def refused(self, status_code: int, headers: Mapping[str, str], text: str) -> float:
        """The wait before asking again after an answer other than 200/204;
        raises ``StreamHTTPError`` for an answer that asking again will not change."""
        # The server's answers are one line; a proxy's error page is cut short.
        message = text.strip().splitlines()[0][:MAX_MESSAGE] if text.strip() else ""
        if status_code in FINAL_STATUSES or status_code < 400:
            raise StreamHTTPError(status_code, message or f"unexpected answer to {self.url}")
        self.last_problem = f"HTTP {status_code}" + (f": {message}" if message else "")
        wait = retry_after(status_code, headers)
        self._count_failure()
        if wait is not None:  # busy (at a stream limit): come back when it says, spread a little
            return min(MAX_RETRY_AFTER, wait * (1 + JITTER * self.rand()))
        return self._delay()

    def dropped(self, problem: BaseException | None, *, connecting: bool = False) -> float:
        """The wait after a stream that ended before the task did (``problem``:
        why, or None for a clean close). A first connection that nobody
        accepts raises ``StreamConnectError`` at once: most likely a wrong URL
        or a server not started, which waiting will not fix."""
        if connecting and not self.connected_once and self.failures == 0:
            raise StreamConnectError(f"cannot connect to {self.url} ({problem}); is the server running?")
        self.last_problem = describe(problem) if problem is not None else "the server closed the stream"
        opened, self._stream_opened = self._stream_opened, None
        if opened is not None and time.monotonic() - opened >= HEALTHY_STREAM:
            self.failures = 0
        self._count_failure()
        return self._delay()

    def _count_failure(self) -> None:
        self.failures += 1
        if self.max_reconnects is not None and self.failures > self.max_reconnects:
            raise StreamGaveUp(self.max_reconnects, self.last_problem)

    def _delay(self) -> float:
        return reconnect_delay(self.base, self.failures, cap=self.max_delay, rand=self.rand)


def describe(problem: BaseException) -> str:
    text = str(problem)
    return f"{type(problem).__name__}: {text}" if text else type(problem).__name__


class StreamState:
    """One task's stream: where it is (the last event id) and how it ended."""

    def __init__(self, url: str, last_event_id: str | int | None, reconnects: Reconnects) -> None:
        self.url = url
        self.last_event_id = None if last_event_id is None else str(last_event_id)
        self.reconnects = reconnects
        self.terminal: Event | None = None  # complete / error / cancelled, once seen
        self.ended = False  # the terminal event, or a 204 (it had ended before last_event_id)

    def receive(self, sse: ServerSentEvent) -> Event | None:
        """Take one message in; the event to hand out, if it is one."""
        if sse.retry is not None:
            self.reconnects.set_retry(sse.retry)
        event = parse_event(sse)
        if event is None:
            return None
        if event.type == ACCESS_EXPIRED:
            # No id (it is the server's, not the task's): resuming starts after
            # the task's last event. httpx-sse repeats the previous id on it.
            raise AccessExpired(self.url, self.last_event_id, event.data)
        if sse.id:
            self.last_event_id = sse.id
        self.reconnects.progressed()
        if event.terminal:
            self.terminal = event
            self.ended = True
        return event

    def params(self) -> list[tuple[str, str]]:
        return []

    def headers(self, token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
        return request_headers(self.last_event_id, token, extra)

    def no_more_events(self) -> None:
        """A 204: the task ended at or before our last event."""
        self.ended = True


def request_headers(
    last_event_id: str | None, token: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    headers = dict(extra or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return headers


def _value_of(data: Any) -> tuple[bool, Any]:
    """(known, value): the task's return value as its ``complete`` event carries it.

    The runner sends a returned dict as the data itself, any other value x
    as ``{"result": x}`` and None as ``{}``; only ``{}`` and a lone
    ``result`` key leave it open which it was (the task may have returned
    ``{}`` or ``{"result": x}`` itself): then the JSON status decides.
    """
    if not isinstance(data, dict):
        return False, None
    fields = {key: value for key, value in data.items() if key not in RUNNER_KEYS}
    if not fields or set(fields) == {"result"}:
        return False, None
    return True, fields


def outcome_of(terminal: Event) -> tuple[bool, Any]:
    """(known, value) for a ``complete`` event; raises the task's failure or cancellation."""
    data = terminal.data if isinstance(terminal.data, dict) else {}
    if terminal.type == "error":
        raise TaskFailed(str(data.get("type", "")), str(data.get("message", "")))
    if terminal.type == "cancelled":
        raise TaskCancelled(str(data.get("message") or "Task cancelled"))
    return _value_of(terminal.data)


def outcome_from_status(url: str, body: Any) -> Any:
    """The task's value from its JSON status; raises its failure or cancellation."""
    if not isinstance(body, dict) or "status" not in body:
        raise StreamError(f"{url} did not answer with a task's JSON status")
    status = body["status"]
    if status == "completed":
        return body.get("final_value")
    if status == "failed":
        error = body.get("error") or {}
        raise TaskFailed(str(error.get("type", "")), str(error.get("message", "")))
    if status == "cancelled":
        raise TaskCancelled()
    raise StreamError(f"the task at {url} has not ended (status {status!r})")


@dataclass
class TrackedTask:
    """A task of a multiplexed stream: how the request names it, and where it stands."""

    model: str  # as the request names it: "Model" or "app_label/Model"
    task_id: str
    cursor: int | None = None  # the id of its last event seen
    ended: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """What its events' data say: ``(_model, _task_id)`` (the model without app label)."""
        return self.model.rpartition("/")[2], self.task_id

    def target(self) -> str:
        """Its ``task=`` value: ``Model/id``, or ``Model/id@cursor`` to resume after its cursor."""
        where = f"{self.model}/{self.task_id}"
        return where if self.cursor is None else f"{where}@{self.cursor}"


TaskSpec = str | tuple[str, object] | tuple[str, object, int | str | None]


def parse_task(spec: TaskSpec) -> TrackedTask:
    """``"Model/id"``, ``"app_label/Model/id"``, either with ``@<last event id>``,
    or ``(model, id)`` / ``(model, id, last event id)``."""
    if isinstance(spec, tuple):
        model, task_id, *rest = spec
        after = rest[0] if rest else None
        return TrackedTask(str(model).strip("/"), str(task_id), None if after is None else int(after))
    where, _, after_text = spec.partition("@")
    model, _, task_id = where.strip("/").rpartition("/")
    if not model or not task_id or (after_text and not after_text.isdigit()):
        raise ValueError(f"{spec!r} is not a task: expected <Model>/<id> or <Model>/<id>@<last event id>")
    return TrackedTask(model, task_id, int(after_text) if after_text else None)


class MuxState:
    """A multiplexed stream (``/stream/?task=...&feed=...``): a cursor per task.

    Each event's ``id:`` is its own task's number, so ``Last-Event-ID`` means
    nothing here: a reconnect names every task not yet ended with
    ``task=<Model>/<id>@<cursor>`` (tasks a feed brought in included), and
    leaves out the ended ones. Events at or before a task's cursor are
    dropped, should a server ever send one twice.
    """

    def __init__(
        self,
        url: str,
        tasks: "list[TrackedTask]",
        feeds: list[str],
        reconnects: Reconnects,
        *,
        history: bool = False,
    ) -> None:
        self.url = url
        self.tasks: dict[tuple[str, str], TrackedTask] = {}
        for task in tasks:
            self.tasks.setdefault(task.key, task)
        if len(self.tasks) > MAX_TASKS:
            raise ValueError(f"at most {MAX_TASKS} tasks per multiplexed stream, not {len(self.tasks)}")
        self.feeds = [feed.strip("/") for feed in feeds]
        self.reconnects = reconnects
        self.history = history
        self.terminals: dict[tuple[str, str], Event] = {}
        self.ended = not self.tasks and not self.feeds

    @property
    def cursors(self) -> dict[tuple[str, str], int | None]:
        """``(model, task id)``: the id of the last event seen of each task (None: none yet)."""
        return {key: task.cursor for key, task in self.tasks.items()}

    def headers(self, token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
        return request_headers(None, token, extra)  # Last-Event-ID means nothing here

    def params(self) -> list[tuple[str, str]]:
        # The tasks named first, then those a feed brought in, up to the
        # server's limit; a feed's running task left out rejoins through the
        # feed (from its latest event).
        unfinished = [task for task in self.tasks.values() if not task.ended][:MAX_TASKS]
        params = [("task", task.target()) for task in unfinished]
        params += [("feed", feed) for feed in self.feeds]
        if self.history:
            params.append(("history", "all"))
        return params

    def receive(self, sse: ServerSentEvent) -> Event | None:
        if sse.retry is not None:
            self.reconnects.set_retry(sse.retry)
        event = parse_event(sse)
        if event is None:
            return None
        if event.type == ACCESS_EXPIRED:
            raise AccessExpired(self.url, None, event.data)
        key = event.task
        seq = int(sse.id) if sse.id.isdigit() else None
        if key is None or seq is None:  # not a task's event: nothing to track
            return event
        task = self.tasks.get(key)
        if task is None:  # a task a feed brought in: named as the feed names its model
            model = next((feed for feed in self.feeds if feed.rpartition("/")[2] == key[0]), key[0])
            task = self.tasks[key] = TrackedTask(model, key[1])
        if task.ended or (task.cursor is not None and seq <= task.cursor):
            return None
        task.cursor = seq
        self.reconnects.progressed()
        if event.terminal:
            task.ended = True
            self.terminals[key] = event
            if not self.feeds and all(t.ended for t in self.tasks.values()):
                self.ended = True
        return event

    def no_more_events(self) -> None:
        """A 204: every task had ended before its cursor."""
        for task in self.tasks.values():
            task.ended = True
        self.ended = True
