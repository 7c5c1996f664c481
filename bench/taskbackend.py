"""Django's tasks framework on our runners against our own StreamTask path.

    poetry run python bench/taskbackend.py [--tasks 100] [--burst 500]

One server (SQLite, the in-memory broker); this process is the application.
- Enqueue-to-start latency: tasks enqueued one at a time (the next once the
  last has ended); latency = the task's first event's ``_timestamp`` (sent as
  the function's first act) - the wall clock just before ``enqueue()`` /
  ``objects.create()``. Three kinds: a StreamTask model (testapp ScriptedTask,
  one event), an async ``@task`` and a sync ``@task`` (one event each).
- Throughput: --burst tasks committed in one transaction; tasks/s = burst /
  (the last one's end - the commit).
- The idle claim step (no pending row) in this process, with TASKS naming our
  backend (EnqueuedTask is queried too) and naming another backend (it is not).
Writes bench/results/taskbackend-*.json. Ratios only mean something within one run.
"""

import argparse
import statistics
import time

from common import Server, machine, save, setup_django


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def first_event_at(model, pk) -> float:
    from datetime import datetime

    from streaming.models import TaskEvent

    payload = (
        TaskEvent.objects.filter(task_type=model._meta.label_lower, task_id=str(pk))
        .order_by("seq")
        .values_list("payload", flat=True)
        .first()
    )
    import json

    return datetime.fromisoformat(json.loads(payload)["_timestamp"]).timestamp()


def wait_finished(model, pks, timeout=120.0):
    deadline = time.monotonic() + timeout
    pks = list(pks)
    while model.objects.filter(pk__in=pks, status__in=["completed", "failed", "cancelled"]).count() < len(
        pks
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{model.__name__}: tasks did not finish")
        time.sleep(0.005)


def kinds():
    from streaming.models import EnqueuedTask
    from streaming.tests import jobs
    from streaming.tests.testapp.models import ScriptedTask

    return {
        "StreamTask (ScriptedTask)": (ScriptedTask, lambda: ScriptedTask.objects.create(steps=1).pk),
        "@task async": (EnqueuedTask, lambda: int(jobs.count_async.enqueue(1).id)),
        "@task sync": (EnqueuedTask, lambda: int(jobs.count_sync.enqueue(1).id)),
    }


def latency(count: int) -> dict:
    out = {}
    for name, (model, create) in kinds().items():
        samples = []
        for _ in range(count):
            began = time.time()
            pk = create()
            wait_finished(model, [pk])
            samples.append((first_event_at(model, pk) - began) * 1000)
        out[name] = {"p50_ms": percentile(samples, 0.5), "p99_ms": percentile(samples, 0.99)}
    return out


def throughput(burst: int) -> dict:
    from django.db import transaction

    out = {}
    for name, (model, create) in kinds().items():
        with transaction.atomic():
            pks = [create() for _ in range(burst)]
        committed = time.time()
        wait_finished(model, pks)
        last = max(model.objects.filter(pk__in=pks).values_list("completed_at", flat=True)).timestamp()
        out[name] = {"tasks_per_s": burst / (last - committed)}
    return out


def claim_step(rounds: int = 300) -> dict:
    from django.test.utils import override_settings

    from streaming.conf import get_settings
    from streaming.tasks import store
    from streaming.tasks.registry import stream_models

    def per_step_us():
        models = stream_models()
        times = []
        for _ in range(rounds):
            began = time.perf_counter()
            store.claim_pending(models, 10, "bench:0:x", 15.0, get_settings())
            times.append((time.perf_counter() - began) * 1e6)
        return statistics.median(times), len(models)

    ours, ours_models = per_step_us()
    from streaming.taskbackend.compat import FRAMEWORK

    with override_settings(TASKS={"default": {"BACKEND": f"{FRAMEWORK}.backends.dummy.DummyBackend"}}):
        other, other_models = per_step_us()
    return {
        "with_our_backend_us": ours,
        "models_queried_with": ours_models,
        "with_another_backend_us": other,
        "models_queried_without": other_models,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--burst", type=int, default=500)
    args = parser.parse_args()
    setup_django()
    server = Server()
    try:
        latency(5)  # warm-up: imports, connections
        lat = latency(args.tasks)
        thr = throughput(args.burst)
    finally:
        server.stop()
    claims = claim_step()
    base = "StreamTask (ScriptedTask)"
    print(f"{'kind':28} {'p50 ms':>8} {'p99 ms':>8} {'tasks/s':>9} {'ratio p50':>10} {'ratio tasks/s':>14}")
    for name in lat:
        print(
            f"{name:28} {lat[name]['p50_ms']:8.1f} {lat[name]['p99_ms']:8.1f} {thr[name]['tasks_per_s']:9.0f} "
            f"{lat[name]['p50_ms'] / lat[base]['p50_ms']:10.2f} "
            f"{thr[name]['tasks_per_s'] / thr[base]['tasks_per_s']:14.2f}"
        )
    print(
        f"idle claim step: {claims['with_our_backend_us']:.0f} us over {claims['models_queried_with']} models "
        f"(TASKS names our backend), {claims['with_another_backend_us']:.0f} us over "
        f"{claims['models_queried_without']} (another backend)"
    )
    path = save(
        "taskbackend",
        {"machine": machine(), "args": vars(args), "latency": lat, "throughput": thr, "claim_step": claims},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
