"""Django's tasks framework on our runners against our own StreamTask path.

    poetry run python bench/taskbackend.py [--tasks 100] [--burst 300] [--repeats 5]

One server (SQLite, the in-memory broker); this process is the application.
- Enqueue-to-start latency: tasks enqueued one at a time (the next once the
  last has ended; the three kinds in turn); latency = the task's first event's ``_timestamp`` (sent as
  the function's first act) - the wall clock just before ``enqueue()`` /
  ``objects.create()``. Three kinds: a StreamTask model (testapp ScriptedTask,
  one event), an async ``@task`` and a sync ``@task`` (one event each).
- Throughput: --burst tasks committed in one transaction; tasks/s = burst /
  (the last one's end - the commit); --repeats rounds of the three kinds in
  turn (order rotated), the median.
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
    """One task at a time, the kinds interleaved (the machine's noise falls on all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in kinds()}
    for _ in range(count):
        for name, (model, create) in kinds().items():
            began = time.time()
            pk = create()
            wait_finished(model, [pk])
            samples[name].append((first_event_at(model, pk) - began) * 1000)
    return {
        name: {"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99)}
        for name, values in samples.items()
    }


def throughput(burst: int, repeats: int) -> dict:
    """Bursts of each kind in turn, ``repeats`` rounds (the order rotated); the median rate."""
    from django.db import transaction

    rates: dict[str, list[float]] = {name: [] for name in kinds()}
    names = list(kinds())
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            model, create = kinds()[name]
            with transaction.atomic():
                pks = [create() for _ in range(burst)]
            committed = time.time()
            wait_finished(model, pks)
            last = max(model.objects.filter(pk__in=pks).values_list("completed_at", flat=True)).timestamp()
            rates[name].append(burst / (last - committed))
    return {name: {"tasks_per_s": statistics.median(values), "all": values} for name, values in rates.items()}


def claim_step(rounds: int = 500) -> dict:
    """The runner's idle claim step (nothing pending) over the models it claims from,
    with and without EnqueuedTask among them; the two interleaved, medians."""
    from django.test.utils import override_settings

    from streaming.conf import get_settings
    from streaming.taskbackend.compat import FRAMEWORK
    from streaming.tasks import store
    from streaming.tasks.registry import stream_models

    with_ours = stream_models()
    with override_settings(TASKS={"default": {"BACKEND": f"{FRAMEWORK}.backends.dummy.DummyBackend"}}):
        without = stream_models()
    settings = get_settings()
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        for name, models in (("with", with_ours), ("without", without)):
            began = time.perf_counter()
            store.claim_pending(models, 10, "bench:0:x", 15.0, settings)
            times[name].append((time.perf_counter() - began) * 1e6)
    return {
        "with_our_backend_us": statistics.median(times["with"]),
        "models_queried_with": len(with_ours),
        "with_another_backend_us": statistics.median(times["without"]),
        "models_queried_without": len(without),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup_django()
    server = Server()
    try:
        latency(5)  # warm-up: imports, connections
        lat = latency(args.tasks)
        thr = throughput(args.burst, args.repeats)
    finally:
        server.stop()
    claims = claim_step()
    base = "StreamTask (ScriptedTask)"
    print(f"{'kind':28} {'p50 ms':>8} {'p99 ms':>8} {'tasks/s':>9} {'ratio p50':>10} {'ratio tasks/s':>14}")
    for name in lat:
        print(
            f"{name:28} {lat[name]['p50_ms']:8.1f} {lat[name]['p99_ms']:8.1f} "
            f"{thr[name]['tasks_per_s']:9.0f} "
            f"{lat[name]['p50_ms'] / lat[base]['p50_ms']:10.2f} "
            f"{thr[name]['tasks_per_s'] / thr[base]['tasks_per_s']:14.2f}"
        )
    print(
        f"idle claim step: {claims['with_our_backend_us']:.0f} us over "
        f"{claims['models_queried_with']} models "
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
