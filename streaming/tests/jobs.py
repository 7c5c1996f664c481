"""@task functions the tests of the tasks backend enqueue (written as any project writes them)."""

import asyncio
import time
from pathlib import Path

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task

from streaming.taskbackend import asend_event, is_cancelled, send_event


@task
def add(a, b):
    return a + b


@task
def count_sync(steps, delay=0.0):
    """A sync function reporting progress: one event per step."""
    for step in range(1, steps + 1):
        send_event("progress", {"step": step, "of": steps})
        time.sleep(delay)
    return {"counted": steps}


@task
async def count_async(steps, delay=0.0):
    for step in range(1, steps + 1):
        await asend_event("progress", {"step": step, "of": steps})
        await asyncio.sleep(delay)
    return {"counted": steps}


@task
def fail(message):
    raise ValueError(message)


@task
async def wait_forever():
    """Until cancelled: an event every 50 ms."""
    tick = 0
    while True:
        tick += 1
        await asend_event("tick", {"tick": tick})
        await asyncio.sleep(0.05)


@task
def wait_forever_sync(stopped_marker=None, check_flag=True):
    """Until cancelled: it learns of it from is_cancelled() (check_flag) or from send_event()
    raising TaskCancelled; then writes ``stopped_marker`` (a file), so a test sees the thread end."""
    tick = 0
    try:
        while not (check_flag and is_cancelled()):
            tick += 1
            send_event("tick", {"tick": tick})
            time.sleep(0.05)
    finally:
        if stopped_marker:
            Path(stopped_marker).write_text(f"stopped after {tick} ticks")


@task(takes_context=True)
def report_context(context, label):
    return {"label": label, "attempt": context.attempt, "id": context.task_result.id}


@task(takes_context=True, recovery="retry", max_attempts=3)
async def survive_a_crash(context, ticks_before_done):
    """Ticks forever on its first attempt (the test kills the server); completes on a retry."""
    tick = 0
    while context.attempt == 1 or tick < ticks_before_done:
        tick += 1
        await asend_event("tick", {"tick": tick, "attempt": context.attempt})
        await asyncio.sleep(0.05)
    return {"attempt": context.attempt}


@task(takes_context=True)
async def fail_on_a_crash(context):
    """The default policy: an interrupted run fails the task."""
    while True:
        await asend_event("tick", {"attempt": context.attempt})
        await asyncio.sleep(0.05)


@task(queue_name="reports")
def in_reports_queue():
    return "reports"


@task
def stamp(label):
    """Returns when it ran, for ordering tests."""
    return {"label": label, "at": time.time()}


@task
def build_report(report_id: int) -> dict:
    """The README's example task (rows stand in for real work)."""
    rows = ["a", "b", "c"]
    for done, _row in enumerate(rows, 1):
        time.sleep(0.05)
        send_event("progress", {"done": done, "total": len(rows)})
    return {"rows": len(rows), "url": f"/reports/{report_id}.pdf"}
