"""How many streams a server process holds: in all, per client address, per task.

Counted when a stream is admitted and released when its connection ends;
nothing here runs per event. Over a limit the client gets a 503 with
Retry-After and every other stream goes on. Refusals are logged as counts
(``RateLimitedLog``, shared with the server's connection limits), never a
line per request.
"""

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Mapping
from functools import cache
from typing import TypeVar

from django.core.exceptions import ImproperlyConfigured

from ..conf import StreamingSettings
from ..keys import TaskKey

logger = logging.getLogger(__name__)

# What a 503 at a limit (here, or the server's connection limit) asks a client to wait, in seconds.
RETRY_AFTER = 5
# Refusals and timeouts are logged at most once per this many seconds, as counts.
LOG_EVERY = 10.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class StreamLimits:
    """The open streams of this process, counted per client and per task."""

    def __init__(self, settings: StreamingSettings) -> None:
        self.max_streams = settings.MAX_STREAMS
        self.max_per_client = settings.MAX_STREAMS_PER_CLIENT
        self.max_per_task = settings.MAX_STREAMS_PER_TASK
        self.open = 0
        self.per_client: dict[str, int] = {}
        self.per_task: dict[TaskKey, int] = {}
        self.refused = RateLimitedLog(
            logging.WARNING,
            f"Refused %d stream(s) with 503 at a stream limit (MAX_STREAMS={self.max_streams}, "
            f"MAX_STREAMS_PER_CLIENT={self.max_per_client}, MAX_STREAMS_PER_TASK={self.max_per_task}). "
            f"Logged at most every {LOG_EVERY:g} s.",
        )
        self.trusted_proxies = tuple(settings.TRUSTED_PROXIES)
        try:
            _networks(self.trusted_proxies)
        except ValueError as exc:
            raise ImproperlyConfigured(f"STREAMING['TRUSTED_PROXIES']: {exc}") from None

    def admit(self, keys: "TaskKey | tuple[TaskKey, ...]", client: str | None) -> "Callable[[], None] | str":
        """A release callable for an admitted stream of one task, or of several
        (a multiplexed stream: one stream, counted for each of its tasks), to
        call once when the stream ends; or why it is refused."""
        if isinstance(keys, TaskKey):
            keys = (keys,)
        if self.open >= self.max_streams:
            return self._refuse(f"Server at its stream limit ({self.max_streams} open streams)")
        if client is not None and self.per_client.get(client, 0) >= self.max_per_client:
            return self._refuse(f"Too many streams from {client} (at most {self.max_per_client})")
        per_task = self.per_task
        if self.max_per_task is not None and any(per_task.get(key, 0) >= self.max_per_task for key in keys):
            return self._refuse(f"Too many streams of this task (at most {self.max_per_task})")
        self.open += 1
        if client is not None:
            self.per_client[client] = self.per_client.get(client, 0) + 1
        if self.max_per_task is not None:
            for key in keys:
                self.per_task[key] = self.per_task.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            if client is not None:
                _decrement(self.per_client, client)
            if self.max_per_task is not None:
                for key in keys:
                    _decrement(self.per_task, key)

        return release

    def _refuse(self, reason: str) -> str:
        self.refused.add()
        return reason


class RateLimitedLog:
    """Counts events; logs the first at once, then what came since at most every LOG_EVERY s.

    One timer per process while events keep coming; none when quiet.
    """

    def __init__(self, level: int, message: str) -> None:
        self.level = level
        self.message = message  # formatted with the count
        self.count = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self) -> None:
        self.count += 1
        if self._timer is None:
            self._tick()

    def flush(self) -> bool:
        """Log what was counted since the last line, if anything (also at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.count:
            return False
        logger.log(self.level, self.message, self.count)
        self.count = 0
        return True

    def _tick(self) -> None:
        self._timer = None
        if self.flush():
            with contextlib.suppress(RuntimeError):  # no loop (a test, a thread): one line each
                self._timer = asyncio.get_running_loop().call_later(LOG_EVERY, self._tick)


K = TypeVar("K")


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def client_address(
    peer: str | None, headers: Mapping[bytes, bytes], trusted_proxies: tuple[str, ...]
) -> str | None:
    """The client's address: the peer's, or behind a trusted proxy the nearest
    address in X-Forwarded-For that is not a trusted proxy itself. A hop that
    is not an address ends the walk at the last one vouched for: whatever a
    client writes further left is its own claim."""
    if peer is None:
        return None
    address = _address(peer)
    if address is None:
        return peer  # a Unix socket's peer, say: one client
    if not _trusted(address, trusted_proxies):
        return str(address)
    forwarded = headers.get(b"x-forwarded-for")
    if not forwarded:
        return str(address)
    vouched = str(address)
    for hop in reversed(forwarded.decode("latin-1").split(",")):
        hop_address = _address(hop.strip())
        if hop_address is None:
            return vouched
        if not _trusted(hop_address, trusted_proxies):
            return str(hop_address)
        vouched = str(hop_address)
    return vouched


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _trusted(address: Address, trusted_proxies: tuple[str, ...]) -> bool:
    return any(address in network for network in _networks(tuple(trusted_proxies)))


@cache
def _networks(trusted_proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in trusted_proxies)
