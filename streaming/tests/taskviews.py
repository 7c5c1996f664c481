"""A view that enqueues a @task and hands the browser its stream URL (README's example)."""

from django.http import JsonResponse
from django.urls import path
from django.views.decorators.http import require_POST

from . import jobs


@require_POST
def start_count(request):
    result = jobs.count_sync.enqueue(int(request.POST.get("steps", "3")), delay=0.05)
    return JsonResponse({"id": result.id, "stream_url": result.stream_url()}, status=202)


urlpatterns = [path("count/", start_count)]
