"""Transports between processes; pick one with STREAMING["BROKER_URL"].

Unset or ``memory://``: in-process (one process, the embedded default).
``redis://host:port/db`` (or ``rediss://``, ``unix://``): Redis, for many
processes and machines (``pip install django-streaming-coordinator[redis]``).

``base.Transport`` is the extension point for another engine; the modules
that implement it are internal.
"""

from typing import TYPE_CHECKING, TypeGuard

from .base import History, Receiver, Transport

if TYPE_CHECKING:
    from ..conf import StreamingSettings

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def create_transport(url: str | None, settings: "StreamingSettings") -> Transport:
    if not url or url.startswith("memory://"):
        from .local import LocalTransport

        return LocalTransport()
    if url.startswith(REDIS_SCHEMES):
        from .redis import RedisTransport

        return RedisTransport(url, settings=settings)
    raise ValueError(
        f"Unsupported STREAMING['BROKER_URL'] {url!r}: use memory:// (or leave it unset) "
        "or redis://host:port/db"
    )


def is_shared(url: str | None) -> TypeGuard[str]:
    """Whether the transport reaches other processes (so --workers makes sense)."""
    return bool(url and not url.startswith("memory://"))


def wake_from_outside(url: str) -> None:
    """Wake every node's runners from a process that runs no node (create_task, shell)."""
    if url.startswith(REDIS_SCHEMES):
        from .redis import wake_from_outside as wake_through_redis

        wake_through_redis(url)


__all__ = ["History", "Receiver", "Transport", "create_transport", "is_shared", "wake_from_outside"]
