"""Throughput of tasks: 1,000 short tasks created at once; time until all complete.

    poetry run python bench/throughput.py [--tasks 1000] [--steps 3]

Embedded default (SQLite, in-memory broker), no watchers. Reports tasks/s and
events persisted per second (event-log rows, terminal events included).
Writes bench/results/throughput-*.json.
"""

import argparse
import time

from common import Server, machine, save, setup_django


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    setup_django()
    from streaming.models import TaskEvent
    from streaming.tests.testapp.models import ScriptedTask

    server = Server()
    try:
        started = time.monotonic()
        ScriptedTask.objects.bulk_create([ScriptedTask(steps=args.steps) for _ in range(args.tasks)])
        while ScriptedTask.objects.exclude(status="completed").exists():
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        events = TaskEvent.objects.count()
    finally:
        server.stop()
    result = {
        "tasks": args.tasks,
        "steps": args.steps,
        "seconds": elapsed,
        "tasks_per_s": args.tasks / elapsed,
        "events_persisted": events,
        "events_persisted_per_s": events / elapsed,
    }
    print(f"{args.tasks} tasks x {args.steps} steps: all complete in {elapsed:.2f} s "
          f"({result['tasks_per_s']:.0f} tasks/s, {result['events_persisted_per_s']:.0f} "
          f"events persisted/s)")  # fmt: skip
    path = save("throughput", {"machine": machine(), "result": result})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
