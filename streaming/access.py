"""Who may watch a task: public classes, Django users, signed stream tokens.

Access is decided once per request, when a stream or a JSON status is asked
for (``web/app.py``'s ``open_stream``, which both HTTP paths go through);
nothing here runs per event. A task class is either public
(``public_stream = True``: anyone who reaches the server) or protected (the
default), and a protected task is opened by one of:

- a stream token (``?token=`` or ``Authorization: Bearer``), minted by the
  application with ``task.stream_token()`` / ``stream_token(tasks)``: signed
  with ``SECRET_KEY``, scoped to task keys, with an expiry. A bad or expired
  token is refused (401), never taken for an anonymous request;
- the Django user of the request's session cookie, read here the way
  ``django.contrib.auth.get_user`` reads it (without writing to the
  session), for whom the task's ``has_stream_permission(user)`` says yes.

Tokens, for ``Signer(salt=TOKEN_SALT).sign_object(..., compress=True)``::

    {"k": ["app_label.modelname:pk", ...], "x": <expiry, Unix seconds>}
"""

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core import signing
from django.core.exceptions import ValidationError
from django.db.models import Model
from django.http.cookie import parse_cookie
from django.utils.crypto import constant_time_compare

from .keys import TaskKey

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser

    from .models import StreamTask

__all__ = [
    "DEFAULT_EXPIRES_IN",
    "TOKEN_SALT",
    "Grant",
    "InvalidToken",
    "TokenExpired",
    "read_token",
    "session_user",
    "stream_token",
]

TOKEN_SALT = "streaming.access.stream-token"
# The latest expiry a token may carry: 9999-12-31T23:59:59Z, the last instant
# a datetime can show (the access_expired event names the expiry).
MAX_EXPIRY = 253402300799
DEFAULT_EXPIRES_IN = 300  # seconds: tokens travel in URLs, which end up in logs


class InvalidToken(Exception):
    """A stream token that is not ours, was altered, or does not parse (401)."""

    def __init__(self, message: str = "Invalid stream token") -> None:
        super().__init__(message)


class TokenExpired(InvalidToken):
    """A stream token past its expiry (401)."""

    def __init__(self, message: str = "Stream token expired") -> None:
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token opens: these tasks, until ``expires_at`` (Unix time)."""

    keys: frozenset[TaskKey]
    expires_at: float


FEED_PK = "*"


def task_key(task: "StreamTask") -> TaskKey:
    """The key a token names a task by: its concrete model (a proxy's rows are its model's) and pk."""
    if task.pk is None:
        raise ValueError(f"{type(task).__name__} has no primary key yet: save it before minting a token")
    return TaskKey.of(task)


def feed_key(model: "type[StreamTask]") -> TaskKey:
    """The key a token names a model's feed by (every task of the model)."""
    return TaskKey.of(model, FEED_PK)


def stream_token(
    tasks: "StreamTask | Iterable[StreamTask]" = (),
    *,
    feeds: "Iterable[type[StreamTask]]" = (),
    expires_in: float = DEFAULT_EXPIRES_IN,
) -> str:
    """A signed token that opens the stream (and JSON status) of ``tasks`` for ``expires_in`` seconds,
    and the feed of every model in ``feeds`` (all its tasks, on the multiplexed stream).

    Mint it in a view of your own, after your own access checks, and hand it
    to the client: ``/stream/<Model>/<id>?token=...`` (a browser's
    EventSource) or ``Authorization: Bearer ...`` (other clients). Keep
    ``expires_in`` short: a URL ends up in logs and browser history.
    """
    if isinstance(tasks, Model):  # one task
        tasks = [tasks]
    keys = sorted({str(task_key(task)) for task in tasks} | {str(feed_key(model)) for model in feeds})
    if not keys:
        raise ValueError("stream_token() needs at least one task or feed")
    if not 0 < expires_in < MAX_EXPIRY - time.time():  # (NaN fails both)
        raise ValueError(
            f"expires_in must be a positive number of seconds before the year 10000, not {expires_in!r}"
        )
    payload = {"k": keys, "x": math.ceil(time.time() + expires_in)}
    return signing.Signer(salt=TOKEN_SALT).sign_object(payload, compress=True)


def read_token(token: str, *, now: float | None = None) -> Grant:
    """The grant of a token minted by ``stream_token()``; raises ``InvalidToken`` or ``TokenExpired``.

    Checked against ``SECRET_KEY`` and ``SECRET_KEY_FALLBACKS``.
    """
    try:
        payload = signing.Signer(salt=TOKEN_SALT).unsign_object(token)
        listed = payload["k"]
        if not isinstance(listed, list) or not all(isinstance(key, str) for key in listed):
            raise ValueError(payload)
        keys = frozenset(TaskKey.parse(key) for key in listed)
        expires_at = payload["x"]
        if not keys or not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise ValueError(payload)
        if not 0 < expires_at <= MAX_EXPIRY:  # also NaN, inf and 10**400 (float() would overflow)
            raise ValueError(payload)
    except (signing.BadSignature, ValueError, TypeError, KeyError):
        raise InvalidToken() from None
    if (time.time() if now is None else now) >= expires_at:
        raise TokenExpired()
    return Grant(keys, float(expires_at))


def request_token(query: dict[str, list[str]], headers: dict[bytes, bytes]) -> str | None:
    """The token a request presents, from ``?token=`` or ``Authorization: Bearer``; None for none.

    Raises ``ValueError`` when both are given (RFC 6750: one method per request).
    """
    in_query = query.get("token")
    authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, credentials = authorization.partition(" ")
    in_header = credentials.strip() if scheme.lower() == "bearer" else None
    if in_query is not None and in_header is not None:
        raise ValueError("Send the stream token once: in ?token= or in Authorization, not both")
    if in_query is not None:
        return in_query[-1]
    return in_header


def session_key(headers: dict[bytes, bytes]) -> str | None:
    """The Django session key in the request's Cookie header, if any."""
    cookie = headers.get(b"cookie")
    if not cookie:
        return None
    value = parse_cookie(cookie.decode("latin-1")).get(settings.SESSION_COOKIE_NAME)
    return value or None


def session_user(key: str) -> "AbstractBaseUser | None":
    """The active user logged in with session ``key``, or None; synchronous (the ORM).

    ``django.contrib.auth.get_user``'s rules: the session's backend must be
    one of AUTHENTICATION_BACKENDS and give the user (ModelBackend refuses
    inactive ones), and the session's auth hash must match the user's
    (password changes log sessions out), with SECRET_KEY or one of
    SECRET_KEY_FALLBACKS. Unlike get_user this never writes to the session:
    a stream has no response to carry a new cookie, so rotating or flushing
    is left to the next ordinary request.
    """
    from django.apps import apps

    if not apps.is_installed("django.contrib.auth"):
        return None
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
        load_backend,
    )

    session = import_module(settings.SESSION_ENGINE).SessionStore(key)
    try:
        user_id = get_user_model()._meta.pk.to_python(session[SESSION_KEY])
        backend_path = session[BACKEND_SESSION_KEY]
    except (KeyError, ValidationError):
        return None
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return None
    user: Any = load_backend(backend_path).get_user(user_id)
    if user is None:
        return None
    if hasattr(user, "get_session_auth_hash"):
        session_hash = session.get(HASH_SESSION_KEY)
        if not session_hash:
            return None
        if not constant_time_compare(session_hash, user.get_session_auth_hash()) and not any(
            constant_time_compare(session_hash, fallback)
            for fallback in user.get_session_auth_fallback_hash()
        ):
            return None
    return user if user.is_authenticated else None
