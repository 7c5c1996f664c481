#!/usr/bin/env python
"""Watch a task's event stream and print each event as it arrives.

    python stream_client.py ExampleTask 1
    python stream_client.py ContinueTask 3 --port 9999
    python stream_client.py --url http://host:8888/stream/ExampleTask/1

There is no read timeout: a task may stay silent for as long as it likes. If
the connection drops before the task ends, the client reconnects and resumes
after the last event it printed (Last-Event-ID).
"""

import argparse
import json
import sys
from typing import Any

from streaming.client import StreamError, stream_events

RULE = "=" * 60


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


def watch(url: str, *, max_reconnects: int) -> tuple[str | None, int]:
    """Print events until a terminal one; returns (last event type, count)."""
    count = 0
    last_type = None
    for event in stream_events(url, max_reconnects=max_reconnects, on_reconnect=reconnecting):
        count += 1
        last_type = event.type
        print_event(count, event.type, event.data)
    return last_type, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Watch a streaming task's events.")
    parser.add_argument("model", nargs="?", help="task model, e.g. ExampleTask")
    parser.add_argument("task_id", nargs="?", help="task id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--url", help="full stream URL (instead of model, id, host and port)")
    parser.add_argument("--max-reconnects", type=int, default=20)
    args = parser.parse_args(argv)
    if args.url:
        url = args.url
    elif args.model and args.task_id:
        url = f"http://{args.host}:{args.port}/stream/{args.model}/{args.task_id}"
    else:
        parser.error("give a model and a task id (e.g. ExampleTask 1), or --url")

    print(RULE)
    print(f"Connecting to: {url}")
    print(RULE)
    print(flush=True)
    try:
        last_type, count = watch(url, max_reconnects=args.max_reconnects)
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
