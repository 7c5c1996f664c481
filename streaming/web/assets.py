"""The library's own static files (streaming.js, the dashboard's and the
admin's scripts and styles), answered by the streaming app itself.

Django serves static files only in DEBUG; a server started without it (the
seed's `runserver_stream`, a first deployment before `collectstatic`) would
give the dashboard and the admin's live tail no script at all. These few
public files are answered at ``STATIC_URL + "streaming/<name>"`` from the
installed package: a fixed list read once, so no path from a request ever
reaches the file system. Behind a web server that serves ``STATIC_ROOT``
such requests never get here.
"""

from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent / "static" / "streaming"
CONTENT_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8"}


class Assets:
    def __init__(self) -> None:
        static_url = str(settings.STATIC_URL or "")
        # Only a path of this server: a CDN's URL is not ours to answer.
        self.prefix = f"{static_url.rstrip('/')}/streaming/" if static_url.startswith("/") else None
        self._files: dict[str, tuple[bytes, bytes]] | None = None

    def find(self, path: str) -> tuple[bytes, bytes] | None:
        """(content type, body) of one of the library's files at ``path``, or None."""
        if self.prefix is None or not path.startswith(self.prefix):
            return None
        if self._files is None:
            self._files = {
                file.name: (CONTENT_TYPES[file.suffix], file.read_bytes())
                for file in ROOT.iterdir()
                if file.suffix in CONTENT_TYPES
            }
        return self._files.get(path[len(self.prefix) :])
