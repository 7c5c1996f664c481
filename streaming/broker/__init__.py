"""Brokers: sequence-ordered fanout of task events between runners and streams.

The HTTP layer talks to a broker alone; runners publish into it. Pick one
with STREAMING["BROKER_URL"]: unset or ``memory://`` for the in-process broker.
"""

from .base import Broker
from .memory import MemoryBroker


def create_broker(url: str | None, *, history, settings) -> Broker:
    if not url or url.startswith("memory://"):
        return MemoryBroker(history=history, settings=settings)
    raise ValueError(
        f"Unsupported STREAMING['BROKER_URL'] {url!r}: this version has the in-memory broker "
        "(leave BROKER_URL unset or use memory://)"
    )


__all__ = ["Broker", "MemoryBroker", "create_broker"]
