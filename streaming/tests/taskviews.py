"""The README's tasks-framework example, served: a view that enqueues a @task and hands
the page its stream URL, and the page (the README's own HTML snippet, read from README.md)."""

import re

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_POST

from . import jobs
from .support import REPO


def readme_snippet() -> str:
    """The ```html block of README's "Using Django's tasks framework"."""
    section = README_SECTION.search((REPO / "README.md").read_text())
    if section is None:
        raise LookupError("README.md has no html block under 'Using Django's tasks framework'")
    return section.group(1)


README_SECTION = re.compile(r"## Using Django's tasks framework.*?```html\n(.*?)```", re.DOTALL)


@require_POST
def start_count(request):
    result = jobs.count_sync.enqueue(int(request.POST.get("steps", "3")), delay=0.05)
    return JsonResponse({"id": result.id, "stream_url": result.stream_url()}, status=202)


@login_required
@require_POST
def start_report(request, report_id):  # as in the README
    result = jobs.build_report.enqueue(report_id)
    return JsonResponse({"id": result.id, "stream_url": result.stream_url(expires_in=600)}, status=202)


@ensure_csrf_cookie
def report_page(request):
    return HttpResponse(f"<!doctype html><meta charset=utf-8><title>Report</title>\n{readme_snippet()}")


urlpatterns = [
    path("count/", start_count),
    path("reports/<int:report_id>/start/", start_report),
    path("reports/page/", report_page),
]
