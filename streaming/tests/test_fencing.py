"""Exactly one run, even when a node stalls (issue 10): fencing a runner that lost its lease.

Two nodes on PostgreSQL + Redis, 3 s leases and a 1 s margin. Node A runs
the tasks; then it stalls: frozen with SIGSTOP, or cut off from its
database by a TCP proxy that stops forwarding. Node B takes the tasks over
when their leases run out. What must hold, whatever the stall:

- the event log never holds an event of a run after another run took the
  task over: per task, the attempts never go back, in number order or in
  the order the events were made (their ``_timestamp``), and nothing comes
  after the end;
- every watcher, on either node, hopping between them with Last-Event-ID or
  not, gets exactly the log: no extra event, none missing, none different;
- a stalled run stops itself (it says so) before its lease can be taken:
  a node cut off from its database stops its runs before the takeover, a
  frozen one before its next event leaves it once it wakes;
- ``/ready`` tells a load balancer that a cut-off node cannot serve
  (503 within a couple of seconds), ``/health`` stays a liveness OK.

Distributed only: skipped without PostgreSQL and Redis (a failure under
STREAMING_REQUIRE_DISTRIBUTED=1), like test_distributed.py. The seed of the
randomized test is printed and can be replayed with FENCING_SEED=<n>.
"""

import itertools
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.db import DatabaseError, transaction

from streaming.keys import TaskKey
from streaming.models import TaskEvent

from . import test_distributed
from .support import ServerProcess, database_url, read_stream, wait_for
from .tcpproxy import TcpProxy
from .testapp.models import FragileTask, ScriptedTask

LEASE = 3.0
MARGIN = 1.0
NODE = {"lease_seconds": LEASE, "lease_margin": MARGIN}
# A pause this short cannot reach a run's deadline (LEASE - MARGIN after the
# start of its last renewal, which began at most LEASE/3 before the pause),
# less some slack for a busy machine.
SURELY_SHORT = LEASE - MARGIN - LEASE / 3 - 0.4
TERMINAL = {"complete", "error", "cancelled"}


# -- what the log and the watchers hold ---------------------------------------------


@dataclass(frozen=True)
class Ev:
    seq: int | None
    type: str
    data: dict

    @property
    def made(self) -> datetime:
        return datetime.fromisoformat(self.data["_timestamp"])

    def describe(self) -> str:
        what = f"{self.type} #{self.seq}"
        if "step" in self.data:
            what += f" (attempt {self.data.get('attempt')} step {self.data['step']})"
        elif self.type == "error":
            what += f" ({self.data.get('type')}: {self.data.get('message')})"
        return f"{what} of {self.data.get('_timestamp', '?')[11:23]}"


def logged(task) -> list[Ev]:
    key = TaskKey.of(task)
    return [
        Ev(seq, type_, json.loads(payload))
        for seq, type_, payload in TaskEvent.objects.filter(task_type=key.label, task_id=key.pk)
        .order_by("seq")
        .values_list("seq", "type", "payload")
    ]


def logged_row_ids(tasks) -> set[int]:
    ids: set[int] = set()
    for task in tasks:
        key = TaskKey.of(task)
        ids.update(TaskEvent.objects.filter(task_type=key.label, task_id=key.pk).values_list("id", flat=True))
    return ids


def epochs(events: list[Ev]) -> list[float]:
    """The run each event (in number order) belongs to: its attempt; an end by
    another runner's recovery (``Interrupted``) is a run of its own, after the
    attempt it interrupted; an end inherits the attempt before it."""
    current = 0.0
    out = []
    for event in events:
        if event.type in ("step", "retry") and "attempt" in event.data:
            current = float(event.data["attempt"])
        elif event.type == "error" and event.data.get("type") == "Interrupted":
            current += 0.5
        out.append(current)
    return out


def log_problems(key: TaskKey, events: list[Ev]) -> list[str]:
    """Everything wrong with one task's log (an empty list: nothing)."""
    problems = []
    if not events:
        return [f"{key}: nothing logged"]
    ends = [e for e in events if e.type in TERMINAL]
    if len(ends) != 1 or events[-1].type not in TERMINAL:
        problems.append(f"{key}: {len(ends)} ends, the last event is {events[-1].describe()}")
    marks = epochs(events)
    pairs = list(zip(events, marks, strict=True))
    for (before, b), (after, a) in itertools.pairwise(pairs):
        if a < b:
            problems.append(
                f"{key}: {after.describe()} numbered after {before.describe()} (attempts go back)"
            )
    # In the order the events were made: once a later run made its first
    # event (or a takeover its error), no earlier run makes another.
    first_made: dict[float, datetime] = {}
    for event, mark in zip(events, marks, strict=True):
        first_made[mark] = min(first_made.get(mark, event.made), event.made)
    for event, mark in zip(events, marks, strict=True):
        later = [(t, m) for m, t in first_made.items() if m > mark and t <= event.made]
        if later:
            t, m = min(later)
            problems.append(
                f"{key}: {event.describe()} made after run {m:g} began at {t.isoformat()[11:23]} "
                "(a stale run)"
            )
    end = max(events, key=lambda e: e.made)
    if end.type not in TERMINAL:
        problems.append(f"{key}: {end.describe()} made after the end {ends[-1].describe() if ends else ''}")
    steps: dict[float, list[int]] = {}
    for event, mark in zip(events, marks, strict=True):
        if event.type == "step":
            steps.setdefault(mark, []).append(event.data["step"])
    for mark, numbers in steps.items():
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{key}: attempt {mark:g} logged steps {numbers} (a hole or a repeat)")
    return problems


def seen_problems(name: str, seen: list[Ev], log: list[Ev]) -> tuple[list[str], list[str]]:
    """What a client saw, from the first event on, against the log: (events
    out of order, different, or missing; events the log does not hold)."""
    problems = []
    ids = [e.seq for e in seen]
    if any(i is None for i in ids) or ids != sorted(set(ids)):
        problems.append(f"{name}: ids not strictly increasing: {ids}")
    by_seq = {e.seq: e for e in log}
    unlogged = [e for e in seen if e.seq not in by_seq]
    for event in seen:
        if event.seq in by_seq and by_seq[event.seq] != event:
            problems.append(f"{name}: got {event.describe()}, the log holds {by_seq[event.seq].describe()}")
    got = set(ids)
    missing = [e for e in log if e.seq not in got]
    if missing:
        problems.append(f"{name}: never got " + "; ".join(e.describe() for e in missing[:5]))
    if not seen or seen[-1].type not in TERMINAL:
        problems.append(f"{name}: did not get to the end ({seen[-1].describe() if seen else 'nothing'})")
    extra = []
    if unlogged:
        extra.append(
            f"{name}: got {len(unlogged)} event(s) the log does not hold: {unlogged[0].describe()}"
            + (f" ... {unlogged[-1].describe()}" if len(unlogged) > 1 else "")
        )
    return problems, extra


class Watcher(threading.Thread):
    """One client of one task: from the first event to the end, resuming with
    Last-Event-ID when a connection ends. ``hops``: after each so many events,
    leave and resume on the next server (a client moved by a load balancer)."""

    def __init__(self, name: str, task, servers: list[ServerProcess], hops: list[int] | None = None):
        super().__init__(name=name, daemon=True)
        self.label = name
        self.path = task.get_stream_path()
        self.servers = servers
        self.hops = list(hops or [])
        self.events: list[Ev] = []
        self.connections: list[tuple[int, int]] = []  # (port, Last-Event-ID)
        self.failures: list[str] = []

    def _got(self, message) -> None:
        self.events.append(Ev(message.id, message.event, message.data))

    def run(self) -> None:
        deadline = time.monotonic() + 90
        leg = 0
        while time.monotonic() < deadline:
            if self.events and self.events[-1].type in TERMINAL:
                return
            server = self.servers[leg % len(self.servers)]
            limit = self.hops[leg] if leg < len(self.hops) else None
            last = self.events[-1].seq if self.events else 0
            self.connections.append((server.port, last))
            before = len(self.events)
            try:
                read_stream(
                    server.url + self.path,
                    headers={"Last-Event-ID": str(last)},
                    limit=limit,
                    timeout=max(1.0, deadline - time.monotonic()),
                    on_event=self._got,
                )
            except (httpx.HTTPError, AssertionError) as exc:
                self.failures.append(f"{server.port}: {type(exc).__name__}: {str(exc)[:200]}")
                if str(exc).startswith("204"):  # nothing after our last event, and the task ended
                    return
                time.sleep(0.2)
                continue
            if limit is not None and len(self.events) - before >= limit:
                leg += 1
        self.failures.append("gave up after 90 s")


# -- node logs --------------------------------------------------------------------

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")


def log_lines(server: ServerProcess) -> list[tuple[datetime, str]]:
    """(when, text) of each line the node logged (its local time, as UTC)."""
    lines = []
    for line in server.log().splitlines():
        match = LOG_LINE.match(line)
        if match:
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").astimezone(UTC)
            lines.append((when, match[2]))
    return lines


def lease_lines(server: ServerProcess, key: TaskKey) -> list[tuple[datetime, str]]:
    """The node's lines about losing or giving up the lease of ``key``."""
    name = str(key)
    return [
        (when, text)
        for when, text in log_lines(server)
        if re.search(rf"{re.escape(name)}\b", text) and "lease" in text.lower()
    ]


# -- the test case --------------------------------------------------------------------


@dataclass
class Round:
    """The tasks of one stall, their watchers, and what was seen."""

    tasks: list
    watchers: list[Watcher] = field(default_factory=list)


class FencingTestCase(test_distributed.DistributedTestCase):
    nodes = 0

    def setUp(self):
        super().setUp()
        self.paused: set[int] = set()
        self.proxy: TcpProxy | None = None
        self.addCleanup(self._release)

    def _release(self):
        # Before tearDown's stops (cleanups run after tearDown: so also there).
        for pid in list(self.paused):
            self.resume_pid(pid)
        if self.proxy is not None:
            self.proxy.heal()

    def tearDown(self):
        self._release()
        super().tearDown()
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None

    # -- nodes ------------------------------------------------------------------

    def node(self, **env) -> ServerProcess:
        server = ServerProcess(env=env or None, **NODE).start()
        self.servers.append(server)
        return server

    def pause(self, server: ServerProcess) -> None:
        os.kill(server.proc.pid, signal.SIGSTOP)
        self.paused.add(server.proc.pid)

    def resume(self, server: ServerProcess) -> None:
        self.resume_pid(server.proc.pid)

    def resume_pid(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.paused.discard(pid)

    def proxied_database_url(self, proxy: TcpProxy) -> str:
        parts = urlsplit(database_url())
        auth = parts.netloc.rpartition("@")[0]
        # sslmode=disable: the proxy reads the protocol (to cut at chosen moments)
        return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}", query="sslmode=disable"))

    # -- tasks ------------------------------------------------------------------

    @staticmethod
    def fresh(tasks):
        return [type(t).objects.get(pk=t.pk) for t in tasks]

    def running_on_node(self, server, tasks) -> bool:
        pid = f":{server.proc.pid}:"
        return all(t.status == "running" and pid in (t.lease_owner or "") for t in self.fresh(tasks))

    def create_on(self, server, *, retry: int, fail: int, steps: int, delay: float) -> list:
        tasks = [ScriptedTask.objects.create(steps=steps, delay=delay) for _ in range(retry)]
        tasks += [FragileTask.objects.create(steps=steps, delay=delay) for _ in range(fail)]
        wait_for(
            lambda: self.running_on_node(server, tasks),
            timeout=15,
            message=f"the tasks to run on {server.port}",
        )
        return tasks

    def wait_steps(self, tasks, count: int) -> None:
        wait_for(
            lambda: all(sum(e.type == "step" for e in logged(t)) >= count for t in tasks),
            timeout=15,
            message=f"{count} logged steps of every task",
        )

    def wait_finished(self, tasks, timeout=40.0) -> None:
        wait_for(
            lambda: all(t.status in ("completed", "failed", "cancelled") for t in self.fresh(tasks)),
            timeout=timeout,
            interval=0.1,
            message="every task to end",
        )

    def watch(self, tasks, a: ServerProcess, b: ServerProcess, rng: random.Random) -> list[Watcher]:
        watchers = []
        for task in tasks:
            key = TaskKey.of(task)
            hops = [rng.randint(2, 8) for _ in range(12)]
            watchers += [
                Watcher(f"{key} on A", task, [a]),
                Watcher(f"{key} on B", task, [b]),
                Watcher(f"{key} hopping B/A", task, [b, a], hops=hops),
            ]
        for watcher in watchers:
            watcher.start()
        return watchers

    def settle(self, tasks) -> None:
        """Give a stale run the time to write what it would (nothing can be
        awaited for a write that must not come): the log unchanged for 0.6 s."""
        last = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = sorted(logged_row_ids(tasks))
            if now == last:
                return
            last = now
            time.sleep(0.6)

    # -- the checks ---------------------------------------------------------------

    def client_problems(self, tasks, watchers, servers) -> tuple[list[str], list[str]]:
        """Every watcher of ``tasks``, and a ``?history=all`` read from each of
        ``servers`` now, against the log: (disagreements, events the log lacks)."""
        problems: list[str] = []
        unlogged: list[str] = []
        for task in tasks:
            key = TaskKey.of(task)
            log = logged(task)
            seen = [(w.label, w.events) for w in watchers if w.path == task.get_stream_path()]
            for name, server in servers.items():
                url = f"{server.url}{task.get_stream_path()}?history=all"
                try:
                    full = [Ev(e.id, e.event, e.data) for e in read_stream(url, timeout=15)]
                except (httpx.HTTPError, AssertionError) as exc:
                    problems.append(f"{key}: history=all on {name}: {exc}")
                    continue
                seen.append((f"{key} history=all on {name}", full))
            for name, events in seen:
                wrong, extra = seen_problems(name, events, log)
                problems += wrong
                unlogged += extra
        return problems, unlogged

    def check_histories(self, tasks, watchers, servers, what=""):
        """The log's invariants, then every client against the log (subtests)."""
        with self.subTest(f"{what}the log: attempts never go back; nothing after a takeover or the end"):
            problems = []
            for task in tasks:
                problems += log_problems(TaskKey.of(task), logged(task))
            self.assertNoProblems(problems, "the event log")
        problems, unlogged = self.client_problems(tasks, watchers, servers)
        with self.subTest(f"{what}every watcher and ?history=all on each node: the log, in order, all of it"):
            self.assertNoProblems(problems, "what clients got")
        with self.subTest(f"{what}no client got an event the log does not hold"):
            self.assertNoProblems(unlogged, "events clients got that the log lacks")

    def assertNoProblems(self, problems, what):
        if problems:
            shown = "\n  ".join(problems[:40])
            more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
            self.fail(f"{what}: {len(problems)} problem(s):\n  {shown}{more}")

    def taken_over(self, tasks) -> list:
        """The tasks whose log shows another run after the first."""
        return [t for t in tasks if len(set(epochs(logged(t)))) > 1]

    def ready(self, server, timeout=2.5) -> int | None:
        try:
            return httpx.get(f"{server.url}/ready", timeout=timeout).status_code
        except httpx.HTTPError:
            return None

    def healthy(self, server, timeout=1.0) -> bool:
        try:
            response = httpx.get(f"{server.url}/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.text == "OK"


class FrozenNodeTests(FencingTestCase):
    def test_a_node_frozen_past_its_leases_sends_nothing_more_and_everyone_sees_the_log(self):
        a = self.node()
        tasks = self.create_on(a, retry=3, fail=3, steps=60, delay=0.1)
        b = self.node()
        watchers = self.watch(tasks, a, b, random.Random(1))
        self.wait_steps(tasks, 4)

        self.pause(a)
        time.sleep(2 * LEASE)
        self.resume(a)

        self.wait_finished(tasks)
        for watcher in watchers:
            watcher.join(30)
        self.settle(tasks)
        stalled = self.taken_over(tasks)

        self.check_histories(tasks, watchers, {"A": a, "B": b})
        with self.subTest("B took every task over: RETRY ran again, FAIL failed"):
            self.assertEqual(len(stalled), len(tasks), [str(TaskKey.of(t)) for t in stalled])
            for task in self.fresh(tasks):
                if isinstance(task, ScriptedTask):
                    self.assertEqual((task.status, task.attempts), ("completed", 2), task)
                else:
                    self.assertEqual(task.status, "failed", task)
        with self.subTest("A says it stopped the runs, and keeps serving"):
            for task in stalled:
                self.assertTrue(lease_lines(a, TaskKey.of(task)), f"A's log names no lease of {task}")
            self.assertTrue(self.healthy(a))
            self.assertEqual(self.ready(a), 200)
            late = ScriptedTask.objects.create(steps=3, delay=0.01)
            seen = read_stream(f"{a.url}{late.get_stream_path()}", headers={"Last-Event-ID": "0"}, timeout=20)
            self.assertEqual([e.event for e in seen], ["step", "step", "step", "complete"])


def locks_a_task_row(request: bytes, answer: bytes) -> bool:
    """A statement of a transaction that locks task rows has been answered (and
    the transaction is still open: ReadyForQuery says 'T')."""
    text = request.upper()
    locking = b'UPDATE "TESTAPP_' in text or (
        b'"TESTAPP_' in text and b"FOR UPDATE" in text and b"SKIP LOCKED" not in text
    )
    return locking and b"Z\x00\x00\x00\x05T" in answer


def autocommit_statement(request: bytes, answer: bytes) -> bool:
    """A statement outside any transaction has been answered (ReadyForQuery 'I')."""
    text = request.upper()
    return b"Z\x00\x00\x00\x05I" in answer and b"COMMIT" not in text and b"ROLLBACK" not in text


def in_transaction(request: bytes, answer: bytes) -> bool:
    """A statement inside a transaction has been answered (ReadyForQuery 'T')."""
    return b"Z\x00\x00\x00\x05T" in answer


def rows_locked(tasks) -> bool:
    """Whether some other transaction holds a lock on one of these task rows."""
    try:
        with transaction.atomic():
            for task in tasks:
                list(type(task).objects.select_for_update(nowait=True).filter(pk=task.pk))
    except DatabaseError:
        return True
    return False


class CutOffNodeTests(FencingTestCase):
    def cut_off_node(self):
        self.proxy = TcpProxy("127.0.0.1", 5432).start()
        return self.node(DATABASE_URL=self.proxied_database_url(self.proxy))

    def test_a_node_cut_off_from_its_database_stops_its_runs_before_the_takeover(self):
        a = self.cut_off_node()
        tasks = self.create_on(a, retry=2, fail=2, steps=60, delay=0.1)
        b = self.node()
        watchers = self.watch(tasks, a, b, random.Random(2))
        self.wait_steps(tasks, 4)

        self.proxy.stall()
        stalled_at = time.monotonic()
        stall_wall = datetime.now(UTC)
        ready_during: list[tuple[float, int | None]] = []
        health_during: list[tuple[float, bool]] = []
        while (elapsed := time.monotonic() - stalled_at) < 2 * LEASE:
            health_during.append((round(elapsed, 2), self.healthy(a)))
            ready_during.append((round(time.monotonic() - stalled_at, 2), self.ready(a)))
            time.sleep(0.1)
        self.proxy.heal()
        healed_at = time.monotonic()

        ready_after = None
        while time.monotonic() < healed_at + 10:
            ready_after = self.ready(a)
            if ready_after == 200:
                break
            time.sleep(0.1)
        ready_after_s = time.monotonic() - healed_at
        self.wait_finished(tasks)
        for watcher in watchers:
            watcher.join(30)
        self.settle(tasks)
        stalled = self.taken_over(tasks)

        self.check_histories(tasks, watchers, {"A": a, "B": b})
        with self.subTest("nothing A made after it stopped a run is in the log, healed or not"):
            # (What A sent before it stopped may be logged late, by B's
            # recovery copying it from Redis: clients saw it.)
            problems = []
            for task in stalled:
                key = TaskKey.of(task)
                said = [when for when, _ in lease_lines(a, key) if when >= stall_wall]
                log = logged(task)
                marks = epochs(log)
                problems += [
                    f"{key}: {e.describe()} made after A stopped the run at {said[0].isoformat()[11:23]}"
                    for e, mark in zip(log, marks, strict=True)
                    if said and mark == marks[0] and e.made > said[0] + timedelta(milliseconds=1)  # log: ms
                ]
            self.assertNoProblems(problems, "late events")
        with self.subTest("B took every task over"):
            self.assertEqual(len(stalled), len(tasks), [str(TaskKey.of(t)) for t in stalled])
        with self.subTest("A stopped each run itself, before B took it over"):
            problems = []
            for task in stalled:
                key = TaskKey.of(task)
                log = logged(task)
                marks = epochs(log)
                takeover = min(e.made for e, m in zip(log, marks, strict=True) if m > marks[0])
                said = [(when, text) for when, text in lease_lines(a, key) if when >= stall_wall]
                if not said:
                    problems.append(f"{key}: A's log says nothing of its lease since the stall")
                elif said[0][0] >= takeover:
                    problems.append(
                        f"{key}: A stopped at {said[0][0].isoformat()[11:23]}, after B took over at "
                        f"{takeover.isoformat()[11:23]}: {said[0][1]}"
                    )
            self.assertNoProblems(problems, "A's stops")
        with self.subTest("/ready: 503 while cut off (within ~2 s), 200 once healed; /health 200 throughout"):
            first_503 = next((t for t, status in ready_during if status == 503), None)
            self.assertIsNotNone(first_503, f"/ready during the stall: {ready_during}")
            self.assertLessEqual(first_503, 3.0, f"/ready during the stall: {ready_during}")
            after_503 = [s for t, s in ready_during if t > first_503 + 0.5]
            self.assertTrue(all(s == 503 for s in after_503), f"/ready during the stall: {ready_during}")
            self.assertEqual(ready_after, 200, f"/ready {ready_after_s:.1f} s after the heal")
            self.assertEqual([t for t, ok in health_during if not ok], [], "/health failed at these times")
            self.assertTrue(self.healthy(a))

    def test_a_node_cut_off_inside_a_transaction_holds_no_other_node_back(self):
        # The partition falls while A's transaction holds locks on its task
        # rows (a fenced log write, an end): PostgreSQL keeps the transaction,
        # and its locks, open for as long as A is cut off. The other node must
        # still take A's tasks over on time and keep its own runs going.
        a = self.cut_off_node()
        tasks = self.create_on(a, retry=1, fail=1, steps=40, delay=0.1)
        b = self.node()
        watchers = self.watch(tasks, a, b, random.Random(4))
        self.wait_steps(tasks, 3)
        give_up = time.monotonic() + 20
        while True:
            self.proxy.stall_when(locks_a_task_row)
            if self.proxy.triggered.wait(2) and rows_locked(tasks):
                break
            if not self.proxy.triggered.is_set():
                # A's runs hold no row lock across a round trip: end one on A
                # (its end updates the row and logs its last event in one
                # transaction), and cut A off there.
                self.pause(b)
                try:
                    tasks.append(FragileTask.objects.create(steps=1))
                    self.proxy.triggered.wait(3)
                finally:
                    self.resume(b)
                if self.proxy.triggered.is_set() and rows_locked(tasks):
                    break
            self.proxy.heal()  # a lock already released, or none: try again
            if time.monotonic() > give_up:
                self.fail("A never held a task row locked in a transaction")
        stalled_at = time.monotonic()

        own = ScriptedTask.objects.create(steps=80, delay=0.1)  # A is cut off: B claims it
        watchers.append(Watcher(f"{TaskKey.of(own)} on B", own, [b]))
        watchers[-1].start()
        taken_after = None
        served = b_ready = None
        while time.monotonic() - stalled_at < 2.5 * LEASE:
            if taken_after is None and all(
                t.status != "running" or pid_mark(b) in (t.lease_owner or "") for t in self.fresh(tasks)
            ):
                taken_after = round(time.monotonic() - stalled_at, 2)
            if served is None and time.monotonic() - stalled_at > 2 * LEASE:
                # A new client of B, past the time A's leases ran out: its
                # request reads the row, like any other.
                try:
                    served = bool(read_stream(f"{b.url}{own.get_stream_path()}", limit=1, timeout=2))
                except (httpx.HTTPError, AssertionError):
                    served = False
                b_ready = self.ready(b)
            time.sleep(0.1)
        self.proxy.heal()

        everything = [*tasks, own]
        self.wait_finished(everything)
        for watcher in watchers:
            watcher.join(30)
        self.settle(everything)

        query = self.proxy.trigger[0].decode("utf-8", "replace")
        cut = f"A cut off after: {query[5:300]!r}"
        with self.subTest("B took A's tasks over while A was still cut off"):
            limit = LEASE + LEASE / 3 + 2
            self.assertIsNotNone(taken_after, f"not within the {2.5 * LEASE:g} s A was cut off; {cut}")
            self.assertLessEqual(taken_after, limit, cut)
        with self.subTest("B's own run went on undisturbed"):
            own.refresh_from_db()
            lost = lease_lines(b, TaskKey.of(own))
            self.assertEqual((own.status, own.attempts), ("completed", 1), f"B: {lost}; {cut}")
        with self.subTest("B served a new client, and said it was ready, while A was cut off"):
            self.assertTrue(served, f"a new client of B got nothing within 2 s; {cut}")
            self.assertEqual(b_ready, 200, cut)
        self.check_histories(everything, watchers, {"A": a, "B": b})

    def test_a_node_whose_database_connections_were_cut_reconnects(self):
        # After a partition the database (or a firewall) may have dropped the
        # node's connections: the node must open new ones, not fail forever.
        # The cut lands once on a statement outside any transaction, once
        # inside one: the error surfaces differently.
        a = self.cut_off_node()
        for where, moment in (
            ("outside a transaction", autocommit_statement),
            ("in a transaction", in_transaction),
        ):
            self.create_on(a, retry=1, fail=0, steps=20, delay=0.05)  # A busy with the database
            self.proxy.stall_when(moment)
            triggered = self.proxy.triggered.wait(5)
            self.proxy.reset()
            self.proxy.heal()
            self.assertTrue(triggered, f"A sent no statement {where}")
            give_up = time.monotonic() + 10
            while (ready := self.ready(a)) != 200 and time.monotonic() < give_up:
                time.sleep(0.1)
            fresh = ScriptedTask.objects.create(steps=2, delay=0.0)
            try:
                self.assertEqual(ready, 200, "/ready")
                self.wait_finished([fresh], timeout=10)
            except AssertionError as exc:
                errors = [line for line in a.log().splitlines() if "Error:" in line]
                self.fail(
                    f"A did not get over its database connections being cut {where}: {exc}; "
                    f"{len(errors)} errors logged, the last: {errors[-1:]}"
                )

    def test_a_lone_node_cut_off_past_its_leases_ends_its_tasks_once_healed(self):
        # No other node to take the tasks over: the node that stopped its own
        # runs must settle them itself (RETRY: run again; FAIL: failed) once
        # its database answers again, not leave them running forever.
        a = self.cut_off_node()
        tasks = self.create_on(a, retry=1, fail=1, steps=30, delay=0.1)
        watchers = self.watch(tasks, a, a, random.Random(6))
        self.wait_steps(tasks, 3)
        self.proxy.stall()
        time.sleep(1.5 * LEASE)
        self.proxy.heal()
        try:
            self.wait_finished(tasks, timeout=LEASE + LEASE / 3 + 10)
        except AssertionError:
            rows = [(str(TaskKey.of(t)), t.status, t.attempts, t.lease_owner) for t in self.fresh(tasks)]
            self.fail(f"tasks left unfinished after the heal: {rows}")
        for watcher in watchers:
            watcher.join(30)
        self.settle(tasks)
        self.check_histories(tasks, watchers, {"A": a})
        retry, fail = self.fresh(tasks)
        said = [line for line in a.log().splitlines() if str(TaskKey.of(retry)) in line]
        told = "\n".join(said[-20:])
        self.assertEqual(retry.status, "completed", told)
        if retry.attempts != 2:
            # The proxy forwards in this (busy) process: on a loaded machine a
            # renewal of the second run can come past its deadline too. That
            # run stops and the policy runs the task once more: the contract,
            # provided that is what happened.
            self.assertEqual(retry.attempts, 3, told)
            self.assertTrue(any("Lost the lease" in line and "(attempt 2)" in line for line in said), told)
        self.assertEqual(fail.status, "failed")


def pid_mark(server: ServerProcess) -> str:
    return f":{server.proc.pid}:"


class PauseLengthsTests(FencingTestCase):
    """Stalls of random length around the lease: the invariants hold for each."""

    BUCKETS = (  # fractions of LEASE_SECONDS
        ("short", 0.1, SURELY_SHORT / LEASE),  # never reaches a deadline: no takeover at all
        ("near the deadline", 0.55, 0.75),  # the run may have to stop itself; taken over or not
        ("about the lease", 0.9, 1.1),
        ("long", 1.4, 1.8),
    )

    def test_at_most_one_run_of_a_task_makes_events_at_any_time_whatever_the_pause(self):
        seed = int(os.environ.get("FENCING_SEED") or random.randrange(1_000_000))
        print(f"\n{type(self).__name__}: FENCING_SEED={seed}", file=sys.stderr)
        rng = random.Random(seed)
        a = self.node()
        b = self.node()
        buckets = list(self.BUCKETS)
        rng.shuffle(buckets)
        for name, low, high in buckets:
            pause = round(rng.uniform(low, high) * LEASE, 2)
            at_step = rng.randint(2, 6)
            what = f"pause {pause} s ({name}) after step {at_step}, FENCING_SEED={seed}: "
            self.pause(b)  # so that A claims this round's tasks
            try:
                tasks = self.create_on(a, retry=1, fail=1, steps=16, delay=0.1)
            finally:
                self.resume(b)
            watchers = self.watch(tasks, a, b, rng)
            self.wait_steps(tasks, at_step)
            self.pause(a)
            time.sleep(pause)
            self.resume(a)
            self.wait_finished(tasks)
            for watcher in watchers:
                watcher.join(30)
            self.settle(tasks)
            self.check_histories(tasks, watchers, {"A": a, "B": b}, what)
            if pause <= SURELY_SHORT:
                with self.subTest(f"{what}not taken over"):
                    for task in self.fresh(tasks):
                        self.assertEqual(
                            (task.status, task.attempts), ("completed", 1), f"{task}: taken over"
                        )
                        self.assertEqual(set(epochs(logged(task))), {1.0})
