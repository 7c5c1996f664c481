"""The seed's scenarios (seeds/TESTING.md), end to end against a real server.

``manage.py test streaming.tests.StreamingSystemTests`` runs this class.
"""

import re
import subprocess
import sys
import threading
import time
from datetime import datetime

import httpx

from demo.models import ContinueTask, ExampleTask

from .servercase import ServerTestCase
from .support import REPO, manage, read_stream, subprocess_env

SEED_EVENTS = ["start", "progress", "progress", "progress", "complete"]


class StreamingSystemTests(ServerTestCase):
    def example(self, **fields):
        fields.setdefault("step_delay", 0.2)
        return ExampleTask.objects.create(**fields)

    def test_single_client_receives_every_event_in_order(self):
        task = self.example(message="Hello, World!")
        events = self.read(task, headers={"Last-Event-ID": "0"})
        self.assertEqual([e.event for e in events], SEED_EVENTS)
        self.assertEqual([e.id for e in events], [1, 2, 3, 4, 5])
        start, *progress, complete = events
        self.assertEqual(start.data["message"], "Hello, World!")
        self.assertEqual(start.data["total_steps"], 3)
        self.assertEqual(
            [(p.data["step"], p.data["message"], p.data["data"]) for p in progress],
            [(i, f"Step {i} of 3", f"Processing step {i}...") for i in (1, 2, 3)],
        )
        self.assertEqual(complete.data["message"], "Task completed successfully")
        for event in events:
            self.assertEqual(event.data["_task_id"], task.pk)
            self.assertEqual(event.data["_model"], "ExampleTask")
            self.assertIsNotNone(datetime.fromisoformat(event.data["_timestamp"]).tzinfo)

    def test_curl_output_has_event_and_data_lines(self):
        task = self.example(step_delay=0.05)
        self.wait_status(task, "completed")
        body = httpx.get(self.url(task, history="all"), timeout=10).text
        blocks = [b for b in body.split("\n\n") if b]
        self.assertEqual(len(blocks), 5)
        first = blocks[0].split("\n")
        self.assertEqual(first[0], "event: start")
        self.assertRegex(
            first[1],
            r'^data: \{"message": "Task created via management command", "total_steps": 3, '
            rf'"_task_id": {task.pk}, "_model": "ExampleTask", "_timestamp": "[^"]+\+00:00"\}}$',
        )
        self.assertEqual(first[2], "id: 1")

    def test_three_clients_receive_the_same_events(self):
        task = self.example(step_delay=0.3)
        results = [None] * 3

        def client(i):
            results[i] = read_stream(self.url(task), headers={"Last-Event-ID": "0"})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for events in results:
            self.assertEqual([(e.id, e.event) for e in events], list(enumerate(SEED_EVENTS, 1)))
        self.assertEqual(results[0], results[1])
        self.assertEqual(results[1], results[2])

    def test_late_joiner_gets_the_latest_event_at_once_then_the_rest(self):
        task = self.example(step_delay=0.5)
        self.wait_logged(task, 3)  # start and two progress steps are out
        events = self.read(task)
        self.assertGreaterEqual(events[0].id, 3, "a late client starts at the latest event")
        self.assertEqual(events[-1].event, "complete")
        ids = [e.id for e in events]
        self.assertEqual(ids, list(range(ids[0], 6)), "then every later event, no gap")

    def test_client_seven_seconds_after_create_task_gets_complete_at_once(self):
        # The seed's default ExampleTask (2 s steps) ends about 6 s after it starts.
        result = manage("create_task", "--type", "example")
        self.assertEqual(result.returncode, 0, result.stderr)
        pk = int(re.search(r"ID: (\d+)", result.stdout)[1])
        time.sleep(7)
        task = ExampleTask.objects.get(pk=pk)
        started = time.monotonic()
        events = self.read(task, timeout=5)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual([e.event for e in events], ["complete"])
        self.assertEqual(events[0].id, 5)

    def test_task_runs_with_no_client_connected(self):
        task = self.example(step_delay=0.05)
        self.wait_status(task, "completed")
        self.assertEqual([e.type for e in self.logged(task)], SEED_EVENTS)
        self.assertEqual(task.attempts, 1)

    def test_disconnect_and_reconnect_gets_the_latest_event(self):
        task = self.example(step_delay=0.4)
        first = self.read(task, headers={"Last-Event-ID": "0"}, limit=1)
        self.assertEqual(first[0].event, "start")
        self.wait_logged(task, 3)  # the task went on without its client
        again = self.read(task)
        self.assertGreaterEqual(again[0].id, 3)
        self.assertEqual(again[-1].event, "complete")

    def test_last_event_id_resumes_after_that_event(self):
        task = self.example(step_delay=0.1)
        self.wait_status(task, "completed")
        events = self.read(task, headers={"Last-Event-ID": "2"})
        self.assertEqual([e.id for e in events], [3, 4, 5])
        events = read_stream(self.url(task, last_event_id=4))
        self.assertEqual([e.id for e in events], [5])
        # After the end there is nothing more: 204 stops an EventSource reconnecting.
        done = httpx.get(self.url(task), headers={"Last-Event-ID": "5"}, timeout=5)
        self.assertEqual(done.status_code, 204)

    def test_continue_task_is_driven_by_another_process(self):
        task = ContinueTask.objects.create(message="Waiting for signal...", poll_interval=0.1)
        seen = []
        reader = threading.Thread(
            target=lambda: seen.extend(read_stream(self.url(task), timeout=60, on_event=None))
        )
        reader.start()
        self.wait_logged(task, 1)
        task.refresh_from_db()
        self.assertEqual(task.status, "running")
        # The seed's one-liner, verbatim but for the id, in a separate process.
        one_liner = (
            "from streaming.models import ContinueTask; import asyncio; "
            f"asyncio.run(ContinueTask.objects.filter(pk={task.pk}).aupdate(continue_field=True))"
        )
        result = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", one_liner],
            cwd=REPO,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("database is locked", result.stderr)
        reader.join(30)
        self.assertEqual([e.event for e in seen], ["started", "final", "complete"])
        self.assertEqual(seen[0].data["continue"], False)
        self.assertEqual(seen[1].data["message"], "Continue signal received")
        self.assertEqual(seen[1].data["continue"], True)
        self.assertEqual(seen[2].data["message"], "Task completed successfully")

    def test_create_task_command_prints_the_seed_output_and_the_server_runs_it(self):
        result = manage("create_task", "--type", "example", "--message", "Hello, World!")
        self.assertEqual(result.returncode, 0, result.stderr)
        pk = int(re.search(r"ID: (\d+)", result.stdout)[1])
        self.assertEqual(
            result.stdout,
            f"Created ExampleTask with ID: {pk}\n"
            "  Message: Hello, World!\n\n"
            "Starting task...\n"
            "✓ Task started\n\n"
            "Connect to task stream:\n"
            f"  curl http://127.0.0.1:8888/stream/ExampleTask/{pk}\n",
        )
        task = ExampleTask.objects.get(pk=pk)
        self.assertNotEqual(task.status, "pending")

    def test_create_continue_task_prints_the_one_liner(self):
        result = manage("create_task", "--type", "continue", "--message", "Waiting for signal...")
        self.assertEqual(result.returncode, 0, result.stderr)
        pk = int(re.search(r"ID: (\d+)", result.stdout)[1])
        self.assertIn(
            f"Created ContinueTask with ID: {pk}\n  Message: Waiting for signal...\n  Continue: False\n\n"
            "  To continue the task, run:\n"
            '    poetry run python manage.py shell -c "from streaming.models import ContinueTask; '
            "import asyncio; asyncio.run(ContinueTask.objects.filter("
            f'pk={pk}).aupdate(continue_field=True))"\n\nStarting task...\n✓ Task started\n',
            result.stdout,
        )
        ContinueTask.objects.filter(pk=pk).update(continue_field=True)
        self.wait_status(ContinueTask.objects.get(pk=pk), "completed")

    def test_stream_client_prints_the_seed_layout(self):
        # Created unstarted, so the client is watching before the first event.
        task = self.example(step_delay=0.2, message="Hello, World!", status="created")
        client = subprocess.Popen(
            [sys.executable, "stream_client.py", "ExampleTask", str(task.pk),
             "--port", str(self.server.port)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        first_line = client.stdout.readline()
        self.assertEqual(first_line, "=" * 60 + "\n")
        time.sleep(1.0)  # the header is printed just before connecting
        task.start()
        out = first_line + client.stdout.read()
        result = subprocess.CompletedProcess(client.args, client.wait(60), out, client.stderr.read())
        self.assertEqual(result.returncode, 0, result.stderr)
        rule = "=" * 60
        self.assertTrue(
            out.startswith(
                f"{rule}\nConnecting to: http://127.0.0.1:{self.server.port}/stream/ExampleTask/"
                f"{task.pk}\n{rule}\n\n"
            ),
            out,
        )
        self.assertTrue(
            out.endswith(f"{rule}\nStream ended with: COMPLETE\nTotal events received: 5\n{rule}\n"),
            out,
        )
        blocks = re.findall(r"\[(\d)\] Event: (\w+)\n    Timestamp: (\S+)\n((?:    .*\n)*)\n", out)
        self.assertEqual([(int(n), t) for n, t, _, _ in blocks], list(enumerate(
            [e.upper() for e in SEED_EVENTS], 1)))  # fmt: skip
        self.assertEqual(blocks[0][3], "    message: Hello, World!\n    total_steps: 3\n")
        self.assertEqual(
            blocks[1][3],
            "    step: 1\n    total_steps: 3\n    message: Step 1 of 3\n    data: Processing step 1...\n",
        )
        self.assertEqual(blocks[4][3], "    message: Task completed successfully\n    total_steps: 3\n")

    def test_stream_client_errors_are_clear(self):
        missing = subprocess.run(
            [sys.executable, "stream_client.py", "ExampleTask", "999999",
             "--port", str(self.server.port)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        self.assertEqual(missing.returncode, 1)
        self.assertIn("404", missing.stderr)
        self.assertIn("not found", missing.stderr)
        self.assertNotIn("Traceback", missing.stderr)
        down = subprocess.run(
            [sys.executable, "stream_client.py", "ExampleTask", "1", "--port", "1"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        self.assertEqual(down.returncode, 1)
        self.assertIn("cannot connect", down.stderr)
        self.assertNotIn("Traceback", down.stderr)

    def test_health(self):
        response = httpx.get(f"{self.server.url}/health", timeout=5)
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.text, "OK")

    def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(self):
        task = self.example(step_delay=0.01)
        base = self.server.url
        cases = [
            ("GET", "/stream/NoSuchModel/1", 404, "Unknown task model"),
            ("GET", "/stream/ExampleTask/999999", 404, "ExampleTask 999999 not found"),
            ("GET", "/stream/auth/User/1", 404, "Unknown task model"),
            ("GET", "/stream/exampletask/1", 404, "names are case-sensitive: 'ExampleTask'?"),
            ("GET", "/stream/ExampleTask/abc", 400, "Malformed task id"),
            ("GET", f"/stream/ExampleTask/{task.pk}?last_event_id=x", 400, "Last-Event-ID"),
            ("GET", f"/stream/ExampleTask/{task.pk}?last_event_id=%C2%B2", 400, "Last-Event-ID"),
            ("GET", f"/stream/ExampleTask/{task.pk}?last_event_id={'9' * 30}", 400, "at most 18 digits"),
            ("POST", f"/stream/ExampleTask/{task.pk}", 405, "not allowed"),
            ("DELETE", f"/stream/ExampleTask/{task.pk}", 405, "not allowed"),
        ]
        for method, path, status, message in cases:
            with self.subTest(path=path, method=method):
                response = httpx.request(method, base + path, timeout=5)
                self.assertEqual(response.status_code, status)
                self.assertIn(message, response.text)
        self.assertEqual(httpx.get(f"{base}/health", timeout=5).text, "OK")
        self.assertEqual(self.read(task, headers={"Last-Event-ID": "0"})[-1].event, "complete")
