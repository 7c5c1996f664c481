"""The library's own static files, answered by the streaming app without DEBUG
(the server the tests start runs with DEBUG off, as the seed's does)."""

from pathlib import Path

import httpx

from .servercase import ServerTestCase

STATIC = Path(__file__).resolve().parents[1] / "static" / "streaming"


class AssetTests(ServerTestCase):
    def get(self, path: str, method: str = "GET") -> httpx.Response:
        return httpx.request(method, f"{self.server.url}{path}", timeout=10)

    def test_the_dashboards_and_the_clients_files_are_served_without_debug(self):
        for name, content_type in (
            ("streaming.js", "text/javascript"),
            ("dashboard.js", "text/javascript"),
            ("admin-tail.js", "text/javascript"),
            ("dashboard.css", "text/css"),
        ):
            with self.subTest(name=name):
                response = self.get(f"/static/streaming/{name}")
                self.assertEqual(response.status_code, 200)
                self.assertTrue(response.headers["content-type"].startswith(content_type))
                self.assertEqual(response.content, (STATIC / name).read_bytes())
        head = self.get("/static/streaming/streaming.js", method="HEAD")
        self.assertEqual((head.status_code, head.content), (200, b""))

    def test_nothing_else_is_read_from_the_file_system(self):
        for path in (
            "/static/streaming/nope.js",
            "/static/streaming/../../settings.py",
            "/static/streaming/%2e%2e/models.py",
            "/static/streaming/",
            "/static/admin/css/base.css",  # Django's (DEBUG off: not served)
        ):
            with self.subTest(path=path):
                self.assertEqual(self.get(path).status_code, 404)
        self.assertEqual(self.get("/static/streaming/streaming.js", method="POST").status_code, 404)

    def test_stream_without_its_slash_gets_the_hint(self):
        response = self.get("/stream")
        self.assertEqual(response.status_code, 404)
        self.assertIn("use /stream/<Model>/<id>", response.text)
