"""End-to-end behaviour beyond the seed: crashes, cancellation, errors, slow clients, shutdown."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import httpx
from django.db import connection
from django.test import TransactionTestCase

from demo.models import ContinueTask, ExampleTask
from streaming.tests.testapp.models import FragileTask, ScriptedTask

from .servercase import ServerTestCase
from .support import REPO, ServerProcess, manage, parse_sse, read_stream, wait_for


class ControlTests(ServerTestCase):
    def test_cancel_task_command_stops_a_running_task(self):
        task = ExampleTask.objects.create(step_delay=5)
        seen = []
        reader = threading.Thread(
            target=lambda: seen.extend(read_stream(self.url(task), headers={"Last-Event-ID": "0"}))
        )
        reader.start()
        self.wait_logged(task, 1)
        result = manage("cancel_task", "ExampleTask", str(task.pk))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Cancellation", result.stdout)
        reader.join(20)
        self.assertEqual([e.event for e in seen], ["start", "cancelled"])
        self.wait_status(task, "cancelled")
        self.assertIsNotNone(task.completed_at)

    def test_cancel_of_a_task_never_started(self):
        result = manage("create_task", "--type", "example", "--no-start")
        self.assertEqual(result.returncode, 0, result.stderr)
        pk = re.search(r"ID: (\d+)", result.stdout)[1]
        self.assertIn(f"start_task ExampleTask {pk}", result.stdout)
        task = ExampleTask.objects.get(pk=pk)
        self.assertEqual(task.status, "created")
        self.assertEqual(manage("cancel_task", "ExampleTask", pk).returncode, 0)
        self.wait_status(task, "cancelled")
        self.assertEqual([e.type for e in self.logged(task)], ["cancelled"])

    def test_start_task_starts_a_created_task(self):
        task = ExampleTask.objects.create(step_delay=0.01, status="created")
        time.sleep(0.3)  # several poll intervals: a created task is not picked up
        task.refresh_from_db()
        self.assertEqual(task.status, "created")
        result = manage("start_task", "ExampleTask", str(task.pk))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.wait_status(task, "completed")
        again = manage("start_task", "ExampleTask", str(task.pk))
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("cannot be started", again.stderr)

    def test_workers_need_a_shared_broker(self):
        result = manage("runserver_stream", "--workers", "2", "--port", "1", broker_url="")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("needs a broker that processes share", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_management_commands_reject_bad_input(self):
        for args, message in [
            (("cancel_task", "NoSuchTask", "1"), "Unknown task model"),
            (("cancel_task", "ExampleTask", "999999"), "does not exist"),
            (("start_task", "ExampleTask", "abc"), "Malformed task id"),
        ]:
            with self.subTest(args=args):
                result = manage(*args)
                self.assertNotEqual(result.returncode, 0)
                self.assertIn(message, result.stderr)
                self.assertNotIn("Traceback", result.stderr)

    def test_exception_in_process_ends_with_an_error_event(self):
        task = ScriptedTask.objects.create(steps=3, fail_at=2)
        events = self.read(task, headers={"Last-Event-ID": "0"})
        self.assertEqual([e.event for e in events], ["step", "error"])
        self.assertEqual(events[-1].data["type"], "ValueError")
        self.assertEqual(events[-1].data["message"], "failing at step 2 as scripted")
        self.wait_status(task, "failed")
        self.assertIn("Traceback", task.error)
        self.assertIn("ValueError: failing at step 2", task.error)
        self.assertIn("failing at step 2", self.server.log())

    def test_json_status(self):
        task = ScriptedTask.objects.create(steps=2, result={"answer": 42})
        self.wait_status(task, "completed")
        response = httpx.get(self.url(task), headers={"Accept": "application/json"}, timeout=5)
        self.assertEqual(response.status_code, 200)
        body = response.json()
        self.assertEqual(body["status"], "completed")
        self.assertEqual(body["final_value"], {"answer": 42})
        self.assertEqual(body["last_event_id"], 3)
        self.assertEqual(body["attempts"], 1)
        self.assertIsNotNone(body["started_at"])
        self.assertIsNotNone(body["completed_at"])
        complete = self.read(task)[-1]
        self.assertEqual(complete.event, "complete")
        self.assertEqual(complete.data["answer"], 42)

    def test_history_all_returns_the_whole_stream(self):
        task = ScriptedTask.objects.create(steps=50)
        self.wait_status(task, "completed")
        events = read_stream(self.url(task, history="all"))
        self.assertEqual([e.id for e in events], list(range(1, 52)))
        self.assertEqual(events[-1].event, "complete")

    def test_app_label_form_of_the_url(self):
        task = ScriptedTask.objects.create(steps=1)
        self.wait_status(task, "completed")
        events = read_stream(f"{self.server.url}/stream/testapp/ScriptedTask/{task.pk}")
        self.assertEqual(events[-1].event, "complete")

    def test_admin_serves_on_the_same_port(self):
        response = httpx.get(f"{self.server.url}/admin/login/", timeout=10)
        self.assertEqual(response.status_code, 200)
        self.assertIn("Django", response.text)


class SlowClientTests(ServerTestCase):
    server_settings = {"client_send_timeout": 1.0, "keepalive_interval": 0.3}

    def test_keepalive_comment_on_an_idle_stream(self):
        task = ContinueTask.objects.create(poll_interval=0.1)
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
            sock.sendall(f"GET {task.get_stream_path()} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            received = b""
            deadline = time.monotonic() + 5
            while b": keep-alive" not in received and time.monotonic() < deadline:
                received += sock.recv(65536)
        self.assertIn(b": keep-alive\n\n", received)
        task.continue_field = True
        task.save()
        self.wait_status(task, "completed")

    def test_a_stalled_client_slows_nobody_and_is_disconnected(self):
        task = ScriptedTask.objects.create(steps=400, payload_size=20_000, status="created")
        stalled = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        # A fixed window (no autotuning) so the stream outgrows the kernel's buffers.
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        stalled.sendall(f"GET {task.get_stream_path()} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        time.sleep(0.3)  # connected before the task starts
        reader_events = []
        reader = threading.Thread(
            target=lambda: reader_events.extend(
                read_stream(self.url(task), headers={"Last-Event-ID": "0"}, timeout=60)
            )
        )
        reader.start()
        task.start()
        reader.join(60)
        # The reading client got all 8 MB while the other read nothing.
        self.assertEqual(len(reader_events), 401)
        self.assertEqual(reader_events[-1].event, "complete")
        self.wait_status(task, "completed")
        # The stalled one is cut off after CLIENT_SEND_TIMEOUT with a reset (what
        # it never read is dropped, not kept in kernel buffers); whatever it got
        # is a prefix, and it can resume from its last id.
        wait_for(lambda: "read nothing" in self.server.log(), message="the stalled client cut off")
        stalled.settimeout(10)
        received = b""
        with self.assertRaises(ConnectionResetError):
            while chunk := stalled.recv(1 << 20):
                received += chunk
        stalled.close()
        ids = [int(x) for x in re.findall(rb"\nid: (\d+)\n", received)]
        self.assertLess(len(ids), 401)
        self.assertEqual(ids, list(range(1, len(ids) + 1)))
        last = ids[-1] if ids else 0
        rest = read_stream(self.url(task), headers={"Last-Event-ID": str(last)})
        self.assertEqual([e.id for e in rest], list(range(last + 1, 402)))


class ShutdownTests(TransactionTestCase):
    def test_sigterm_ends_streams_with_a_retry_hint_and_requeues_retryable_tasks(self):
        server = ServerProcess().start()
        try:
            task = ScriptedTask.objects.create(steps=100, delay=0.1)
            with (
                httpx.Client(timeout=10) as client,
                client.stream("GET", f"{server.url}{task.get_stream_path()}") as response,
            ):
                chunks = response.iter_bytes()
                self.assertIn(b"event: step", next(chunks))
                server.proc.send_signal(signal.SIGTERM)
                rest = b"".join(chunks)
            self.assertIn(b"retry: ", rest)
            # uvicorn re-raises the signal once it has shut down cleanly.
            self.assertIn(server.proc.wait(10), (0, -signal.SIGTERM))
            self.assertIn("Application shutdown complete", server.log())
            task.refresh_from_db()
            self.assertEqual(task.status, "pending")
            self.assertIsNone(task.lease_owner)
        finally:
            server.stop()
        # The next server takes it up again.
        server = ServerProcess().start()
        try:
            events = read_stream(f"{server.url}{task.get_stream_path()}?history=all", timeout=60)
            self.assertIn("retry", [e.event for e in events])
            self.assertEqual(events[-1].event, "complete")
        finally:
            server.stop()

    def test_unix_socket(self):
        path = os.path.join(tempfile.mkdtemp(), "stream.sock")
        server = ServerProcess(socket_path=path).start()
        try:
            task = ScriptedTask.objects.create(steps=2)
            transport = httpx.HTTPTransport(uds=path)
            with httpx.Client(transport=transport, timeout=10) as client:
                wait_for(
                    lambda: (
                        client.get(
                            f"http://localhost{task.get_stream_path()}",
                            headers={"Accept": "application/json"},
                        ).json()["status"]
                        == "completed"
                    )
                )
                body = client.get(f"http://localhost{task.get_stream_path()}?history=all").text
            self.assertEqual([e.event for e in parse_sse(body)], ["step", "step", "complete"])
            self.assertIn(f"Starting streaming server on unix:{path}", server.log())
        finally:
            server.stop()


class CrashRecoveryTests(TransactionTestCase):
    def test_kill_9_and_restart_every_task_reaches_a_terminal_event(self):
        server = ServerProcess().start()
        retried = ScriptedTask.objects.create(steps=30, delay=0.1)
        failed = FragileTask.objects.create(steps=30, delay=0.1)
        seen = {retried.pk: [], failed.pk: []}

        def watch(task):
            with contextlib.suppress(httpx.HTTPError, AssertionError):  # the server dies under us
                read_stream(
                    f"{server.url}{task.get_stream_path()}",
                    headers={"Last-Event-ID": "0"},
                    on_event=seen[task.pk].append,
                )

        readers = [threading.Thread(target=watch, args=(t,)) for t in (retried, failed)]
        for reader in readers:
            reader.start()
        wait_for(lambda: all(len(v) >= 5 for v in seen.values()), message="events before the kill")
        server.kill9()
        for reader in readers:
            reader.join(10)
        for task in (retried, failed):
            task.refresh_from_db()
            self.assertEqual(task.status, "running", "a killed server leaves its tasks running")

        server = ServerProcess().start()  # same host: dead owner detected at once
        try:
            for task, last_type in ((retried, "complete"), (failed, "error")):
                last_seen = seen[task.pk][-1].id
                rest = read_stream(
                    f"{server.url}{task.get_stream_path()}",
                    headers={"Last-Event-ID": str(last_seen)},
                    timeout=30,
                )
                self.assertEqual(rest[-1].event, last_type)
                self.assertTrue(all(e.id > last_seen for e in rest))
                full = read_stream(f"{server.url}{task.get_stream_path()}?history=all")
                ids = [e.id for e in full]
                self.assertEqual(ids, sorted(set(ids)), "no duplicate, in order")
                # Resuming lost nothing the log holds after the client's last id.
                self.assertEqual([e.id for e in full if e.id > last_seen], [e.id for e in rest])
            retried.refresh_from_db()
            failed.refresh_from_db()
            self.assertEqual((retried.status, retried.attempts), ("completed", 2))
            self.assertEqual((failed.status, failed.attempts), ("failed", 1))
            full = read_stream(f"{server.url}{retried.get_stream_path()}?history=all")
            retry = [e for e in full if e.event == "retry"]
            self.assertEqual(len(retry), 1)
            self.assertGreater(retry[0].id, seen[retried.pk][-1].id)
            error = read_stream(f"{server.url}{failed.get_stream_path()}")[-1]
            self.assertEqual(error.data["type"], "Interrupted")
        finally:
            server.stop()


class StreamClientTests(TransactionTestCase):
    def start_client(self, server, task):
        return subprocess.Popen(
            [sys.executable, "stream_client.py", type(task).stream_name(), str(task.pk),
             "--port", str(server.port)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def test_ctrl_c_closes_the_client_cleanly(self):
        server = ServerProcess().start()
        try:
            task = ContinueTask.objects.create(poll_interval=0.1)
            client = self.start_client(server, task)
            lines = []
            while "Event: STARTED" not in "".join(lines):
                lines.append(client.stdout.readline())
            client.send_signal(signal.SIGINT)
            out = "".join(lines) + client.stdout.read()
            err = client.stderr.read()
            self.assertEqual(client.wait(10), 0)
            self.assertIn("Connection closed by user", out)
            self.assertNotIn("Traceback", err)
        finally:
            server.stop()

    def test_client_resumes_across_a_server_restart(self):
        server = ServerProcess().start()
        client = None
        try:
            task = ScriptedTask.objects.create(steps=40, delay=0.1)
            client = self.start_client(server, task)
            first = client.stdout.readline()
            self.assertEqual(first, "=" * 60 + "\n")
            # The client is connected once it has printed an event (killing the
            # server before that is the "cannot connect" case, not a resume).
            printed = []
            while "Event:" not in "".join(printed):
                line = client.stdout.readline()
                self.assertTrue(line, "the client ended before printing an event")
                printed.append(line)
            wait_for(lambda: len(read_stream(f"{server.url}{task.get_stream_path()}?history=all",
                                             limit=5)) >= 5, message="five events")  # fmt: skip
            server.kill9()
            server = ServerProcess(port=server.port).start()
            out, err = client.communicate(timeout=60)
            out = "".join(printed) + out
        finally:
            server.stop()
            if client:
                client.kill()
        self.assertEqual(client.returncode, 0, err)
        self.assertIn("reconnecting", out)
        self.assertIn("Stream ended with: COMPLETE", out)
        self.assertIn("Event: RETRY", out)


class OtherAsgiServerTests(ServerTestCase):
    """config.asgi:application under plain uvicorn: the portable ASGI path."""

    server_settings = {
        "command": [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", "{port}"],
    }

    def test_streams_and_runs_tasks_under_plain_uvicorn(self):
        task = ScriptedTask.objects.create(steps=3)
        with httpx.stream("GET", self.url(task, history="all"), timeout=15) as response:
            self.assertEqual(response.headers["transfer-encoding"], "chunked")  # not our socket path
            body = response.read().decode()
        events = parse_sse(body)
        self.assertEqual([e.event for e in events], ["step", "step", "step", "complete"])
        self.assertEqual([e.id for e in events], [1, 2, 3, 4])
        self.assertEqual(httpx.get(f"{self.server.url}/stream/ScriptedTask/0", timeout=5).status_code, 404)


@unittest.skipUnless(connection.vendor == "postgresql", "PostgreSQL wake-ups: run the suite on PostgreSQL")
class PostgresWakeTests(ServerTestCase):
    """PostgreSQL without Redis: another process's new task wakes the server by NOTIFY."""

    server_settings = {"broker_url": "memory://", "poll_interval": 60}

    def test_a_task_created_by_another_process_starts_at_once(self):
        time.sleep(0.5)  # past the server's first poll; the next is a minute away
        created = manage("create_task", "--type", "example", broker_url="memory://")
        self.assertEqual(created.returncode, 0, created.stderr)
        pk = int(re.search(r"ID: (\d+)", created.stdout).group(1))
        task = ExampleTask.objects.get(pk=pk)
        self.wait_status(task, "running", "completed", timeout=5)
