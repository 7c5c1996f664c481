"""Brokers: sequence-ordered fanout of task events between runners and streams.

The HTTP layer talks to a broker alone; runners publish into it. Pick one
with STREAMING["BROKER_URL"]: unset or ``memory://`` for the in-process broker,
``redis://host:port/db`` for the Redis broker (many processes and machines).
"""

from .base import Broker
from .memory import MemoryBroker


def create_broker(url: str | None, *, history, settings) -> Broker:
    if not url or url.startswith("memory://"):
        return MemoryBroker(history=history, settings=settings)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisBroker

        return RedisBroker(url, history=history, settings=settings)
    raise ValueError(
        f"Unsupported STREAMING['BROKER_URL'] {url!r}: use memory:// (or leave it unset) "
        "or redis://host:port/db"
    )


def is_shared(url: str | None) -> bool:
    """Whether the broker reaches other processes (so --workers makes sense)."""
    return bool(url) and not url.startswith("memory://")


__all__ = ["Broker", "MemoryBroker", "create_broker", "is_shared"]
