"""Pages of other origins (CORS): which may read streams and statuses, and the headers they get.

A browser sends ``Origin`` with an ``EventSource`` or ``fetch`` of another
origin. Such a request is answered only for an origin in
``STREAMING["CORS_ALLOWED_ORIGINS"]``; any other is refused (403) before
anything else is looked at, so a page the project did not allow gets no
stream, not merely a stream it cannot read.
"""

from typing import NamedTuple
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from ..conf import StreamingSettings

Headers = tuple[tuple[bytes, bytes], ...]

# What a preflight (a fetch with Authorization, say) may ask for; 600 s is
# under every browser's cap, so a page preflights once per ten minutes.
PREFLIGHT_HEADERS: Headers = (
    (b"access-control-allow-methods", b"GET"),
    (b"access-control-allow-headers", b"authorization, last-event-id, accept, cache-control"),
    (b"access-control-max-age", b"600"),
)
DEFAULT_PORTS = {"http": 80, "https": 443}


class CrossOrigin(NamedTuple):
    """An allowed request of another origin: the headers every reply to it
    carries, and whether its cookies (the Django session) may be used."""

    headers: Headers
    credentials: bool


class Cors:
    def __init__(self, settings: StreamingSettings) -> None:
        origins = settings.CORS_ALLOWED_ORIGINS
        if isinstance(origins, str):
            raise ImproperlyConfigured("STREAMING['CORS_ALLOWED_ORIGINS'] is a list of origins, not a string")
        self.any = "*" in origins
        self.credentials = settings.CORS_ALLOW_CREDENTIALS
        if self.any and self.credentials:
            raise ImproperlyConfigured(
                "STREAMING['CORS_ALLOW_CREDENTIALS'] cannot be used with CORS_ALLOWED_ORIGINS = ['*']: "
                "list the origins whose pages may stream with the user's cookies"
            )
        self.allowed = frozenset(origin.rstrip("/").lower() for origin in origins if origin != "*")
        for origin in self.allowed:
            parts = urlsplit(origin)
            if origin != "null" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
                raise ImproperlyConfigured(
                    f"STREAMING['CORS_ALLOWED_ORIGINS']: {origin!r} is not an origin (scheme://host[:port])"
                )

    def check(self, origin: bytes, host: bytes | None) -> CrossOrigin | str | None:
        """None: the request is of the page's own origin (``host``: the host it
        was sent to). A ``CrossOrigin``: allowed. A string: refused, and why."""
        text = origin.decode("latin-1").strip()
        if _same_origin(text, host):
            return None
        if self.any:
            return CrossOrigin(((b"access-control-allow-origin", b"*"),), credentials=False)
        if text.lower() not in self.allowed:
            return f"Origin {text[:200]} may not read streams here (STREAMING['CORS_ALLOWED_ORIGINS'])\n"
        allow: Headers = ((b"access-control-allow-origin", origin), (b"vary", b"Origin"))
        if self.credentials:
            allow += ((b"access-control-allow-credentials", b"true"),)
        return CrossOrigin(allow, credentials=self.credentials)


def _same_origin(origin: str, host: bytes | None) -> bool:
    """Whether ``origin`` names ``host``, the host the request was sent to."""
    if host is None or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
        target = urlsplit("//" + host.decode("latin-1"))
        origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        target_port = target.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a malformed port in either
        return False
    return bool(parts.hostname) and parts.hostname == target.hostname and origin_port == target_port
