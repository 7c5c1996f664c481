"""The server's CPU seconds (user + sys) over a whole bench/fanout.py run, two trees alternating.

    python bench/fanout_cpu.py BASE_TREE [PAIRS]     # e.g. a worktree of an older commit

Each run is ``bench/fanout.py --watchers 1000`` in that tree (its own server
code); the CPU of every ``manage.py runserver_stream`` process is sampled
from /proc every 0.1 s. The same work in both trees, so the CPU seconds
compare the server's cost, whatever the load generator got.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
TREES = {"base": sys.argv[1] if len(sys.argv) > 1 else str(HERE), "main": str(HERE)}
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return None


def run(tree):
    seen = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            out = subprocess.run(
                ["pgrep", "-f", "manage.py runserver_stream"], capture_output=True, text=True
            ).stdout
            for pid in out.split():
                c = cpu_of(pid)
                if c is not None:
                    seen[pid] = c
            time.sleep(0.1)

    t = threading.Thread(target=watch)
    t.start()
    out = subprocess.run(
        [PY, "bench/fanout.py", "--watchers", "1000"], cwd=TREES[tree], capture_output=True, text=True
    ).stdout
    done.set()
    t.join()
    ratio = [line for line in out.splitlines() if line.startswith("| 1,000 | 1,000")]
    return sum(seen.values()), len(seen), ratio[0].split("|")[5].strip() if ratio else "?"


for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    for tree in ("base", "main"):
        cpu, n, ratio = run(tree)
        load = os.getloadavg()[0]
        print(
            f"{i + 1} {tree} server_cpu={cpu:.2f}s servers={n} ours/ceiling={ratio} load={load:.2f}",
            flush=True,
        )
