#!/usr/bin/env python
"""Watch a task's event stream and print each event as it arrives.

    python stream_client.py ExampleTask 1
    python stream_client.py ContinueTask 3 --port 9999
    python stream_client.py --url http://host:8888/stream/ExampleTask/1
    python stream_client.py ExampleTask 1 --progress        # a progress bar instead (tqdm)
    python stream_client.py Report 7 --token "$TOKEN"        # a protected task

There is no read timeout: a task may stay silent for as long as it likes. If
the connection drops before the task ends, the client reconnects and resumes
after the last event it printed (Last-Event-ID).

``--progress`` draws a bar from events whose data carry ``step`` and
``total_steps`` (or ``total``), or ``progress`` as a fraction from 0 to 1,
with the event's ``message`` as the bar's description.
"""

import argparse
import json
import sys
from typing import Any

from streaming.client import Event, StreamError, TaskStream

RULE = "=" * 60
PROGRESS_EXTRA = "pip install 'django-streaming-coordinator[progress]'"


def print_event(number: int, event_type: str, data: Any) -> None:
    print(f"[{number}] Event: {event_type.upper()}")
    if isinstance(data, dict):
        timestamp = data.get("_timestamp")
        if timestamp:
            print(f"    Timestamp: {timestamp}")
        for key, value in data.items():
            if not key.startswith("_"):
                shown = json.dumps(value) if isinstance(value, (dict, list)) else value
                print(f"    {key}: {shown}")
    else:
        print(f"    data: {data}")
    print(flush=True)


def reconnecting(last_id: str | None, attempt: int) -> None:
    print(f"(connection lost; reconnecting after event {last_id or 'none'})", flush=True)


class ProgressBar:
    """A tqdm bar fed by events: ``step``/``total_steps`` (or ``total``), or ``progress`` 0..1."""

    def __init__(self, tqdm: Any) -> None:
        self.tqdm = tqdm
        self.bar: Any = None

    def update(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        total = data.get("total_steps", data.get("total"))
        step = data.get("step")
        fraction = data.get("progress")
        if _number(fraction) and not _number(step):
            total, step = 100, round(min(max(fraction, 0.0), 1.0) * 100)
        message = data.get("message")
        if event.type == "error" and data.get("type"):
            message = f"{data['type']}: {message}"
        if self.bar is None:  # drawn at the first event, so nothing shows before the stream opens
            desc = None if message is None else str(message)
            self.bar = self.tqdm(
                total=total if _number(total) else None, desc=desc, file=sys.stdout, unit="step"
            )
        if _number(total) and total != self.bar.total:
            self.bar.total = total
        if _number(step):
            self.bar.n = step
        elif event.type == "complete" and self.bar.total:
            self.bar.n = self.bar.total  # done, even when the steps came before we connected
        if message is not None:
            self.bar.set_description_str(str(message), refresh=False)
        self.bar.refresh()

    def reconnecting(self, last_id: str | None, attempt: int) -> None:
        self.tqdm.write(f"(connection lost; reconnecting after event {last_id or 'none'})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def watch(
    url: str, *, max_reconnects: int, token: str | None = None, progress: Any = None
) -> tuple[str | None, int]:
    """Print events (or feed the bar) until a terminal one; returns (last event type, count)."""
    count = 0
    last_type = None
    bar = ProgressBar(progress) if progress is not None else None
    try:
        with TaskStream(
            url,
            token=token,
            max_reconnects=max_reconnects,
            on_reconnect=bar.reconnecting if bar else reconnecting,
        ) as stream:
            for event in stream:
                count += 1
                last_type = event.type
                if bar is not None:
                    bar.update(event)
                else:
                    print_event(count, event.type, event.data)
    finally:
        if bar is not None:
            bar.close()
            print(flush=True)
    return last_type, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Watch a streaming task's events.")
    parser.add_argument("model", nargs="?", help="task model, e.g. ExampleTask")
    parser.add_argument("task_id", nargs="?", help="task id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--url", help="full stream URL (instead of model, id, host and port)")
    parser.add_argument("--max-reconnects", type=int, default=20)
    parser.add_argument("--token", help="a stream token for a protected task (sent as Authorization: Bearer)")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="draw a progress bar (tqdm) from events carrying step and total_steps, instead of printing them",
    )
    args = parser.parse_args(argv)
    if args.url:
        url = args.url
    elif args.model and args.task_id:
        url = f"http://{args.host}:{args.port}/stream/{args.model}/{args.task_id}"
    else:
        parser.error("give a model and a task id (e.g. ExampleTask 1), or --url")
    tqdm = None
    if args.progress:
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"Error: --progress needs tqdm: {PROGRESS_EXTRA}", file=sys.stderr)
            return 2

    print(RULE)
    print(f"Connecting to: {url}")
    print(RULE)
    print(flush=True)
    try:
        last_type, count = watch(url, max_reconnects=args.max_reconnects, token=args.token, progress=tqdm)
    except StreamError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nConnection closed by user")
        return 0
    print(RULE)
    print(f"Stream ended with: {(last_type or 'nothing').upper()}")
    print(f"Total events received: {count}")
    print(RULE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
