"""The demo project's front page: where to go from here."""

from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>django-streaming-coordinator demo</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }}
code {{ background: #f0f2f5; padding: .1rem .3rem; border-radius: 4px; }}
</style></head>
<body>
<h1>django-streaming-coordinator demo</h1>
<ul>
<li><a href="/streaming/">The live dashboard</a>: every task, live (staff users; log in first)</li>
<li><a href="/admin/">The admin</a></li>
<li>A stream: <code>curl {origin}/stream/ExampleTask/1</code></li>
</ul>
<p>No user yet? <code>scripts/demo.sh</code> makes a staff user for the dashboard
(<code>python manage.py demo_user</code> does it again), or
<code>python manage.py createsuperuser</code>.</p>
</body></html>
"""


def index(request: HttpRequest) -> HttpResponse:
    return HttpResponse(format_html(PAGE, origin=f"{request.scheme}://{request.get_host()}"))
