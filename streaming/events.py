"""Events: what a task sends, and its one encoding as Server-Sent Events bytes.

An event is encoded once, when it is sent; every subscriber of every stream
gets the same bytes.
"""

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

COMPLETE = "complete"
ERROR = "error"
CANCELLED = "cancelled"
RETRY = "retry"
TERMINAL_TYPES = frozenset({COMPLETE, ERROR, CANCELLED})
# Sent by the runner alone: a task ends by returning, raising or being cancelled.
RESERVED_TYPES = TERMINAL_TYPES | {RETRY}

_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
KEEPALIVE = b": keep-alive\n\n"
RUNNER_KEYS = ("_task_id", "_model", "_timestamp")


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    type: str
    payload: str  # the JSON text of the data: line
    sse: bytes = field(init=False, repr=False, compare=False)  # encoded once, sent to all

    def __post_init__(self) -> None:
        object.__setattr__(self, "sse", encode_sse(self.seq, self.type, self.payload))

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def data(self) -> dict[str, Any]:
        return json.loads(self.payload)


def encode_sse(seq: int, event_type: str, payload: str) -> bytes:
    # event and data first, as the seed's curl output shows them; then id.
    return f"event: {event_type}\ndata: {payload}\nid: {seq}\n\n".encode()


def notice(event_type: str, data: dict[str, Any]) -> bytes:
    """An event from the server itself, not from the task: no ``id:``, so a
    client's Last-Event-ID (where it resumes) stays on the task's last event."""
    return f"event: {event_type}\ndata: {json.dumps(data)}\n\n".encode()


def retry_hint(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


def validate_event_type(event_type: object) -> str:
    if not isinstance(event_type, str) or not _EVENT_TYPE.fullmatch(event_type):
        raise ValueError(
            f"Event type must be 1-64 characters of letters, digits and _.:- ; got {event_type!r}"
        )
    return event_type


def build_payload(
    data: dict[str, Any] | None, *, task_id: object, model_name: str, timestamp: datetime | None = None
) -> str:
    """The data: JSON: the task's fields, then _task_id, _model and _timestamp."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TypeError(f"Event data must be a dict, got {type(data).__name__}")
    # The runner's keys come last and cannot be spoofed by the task.
    body = {k: v for k, v in data.items() if k not in RUNNER_KEYS}
    body["_task_id"] = task_id
    body["_model"] = model_name
    body["_timestamp"] = (timestamp or datetime.now(UTC)).isoformat()
    try:
        # allow_nan=False: NaN and Infinity are not JSON; browsers reject them.
        return json.dumps(body, cls=DjangoJSONEncoder, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"Event data is not JSON serializable: {exc}") from None


def to_json_value(value: object) -> Any:
    """A task's return value as it will be stored (JSON round trip), or TypeError."""
    try:
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"process() returned a value that is not JSON serializable: {exc}") from None
