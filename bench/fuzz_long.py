"""The hypothesis fuzz tests at a bigger scale: a longer hunt, locally.

    .venv/bin/python bench/fuzz_long.py [--scale 20] [--tree OTHER_CHECKOUT] [--label LABEL] [TEST ...]

Runs ``manage.py test streaming.tests.test_fuzz`` (or the given test labels)
with STREAMING_FUZZ_SCALE=<scale>, which multiplies every property's
max_examples (streaming/tests/test_fuzz.py: 250 encoder examples become
5,000 at 20; 250 raw-socket requests 5,000; 400 ASGI scopes 8,000; 300
credential sets 6,000). The test database is an SQLite file in the hostile
bench directory (never the checkout's), so it runs beside other test runs.
Prints the time and the outcome; a failure prints hypothesis's falsifying
example, as the test run does.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from hostile import BENCH_DIR, PYTHON, REPO, tree_commit


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=20)
    parser.add_argument("--tree", default=str(REPO))
    parser.add_argument("--label", default="")
    parser.add_argument("tests", nargs="*", default=["streaming.tests.test_fuzz"])
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    name = f"fuzz-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMING_")}
    env.pop("DJANGO_DEBUG", None)
    env.update(
        STREAMING_FUZZ_SCALE=str(args.scale),
        DATABASE_URL=f"sqlite:///{BENCH_DIR / f'{name}.sqlite3'}",  # the test database: test_<name>
        PYTHONPATH=str(tree),
        PYTHONUNBUFFERED="1",
    )
    print(f"tree: {tree} ({tree_commit(tree)}); STREAMING_FUZZ_SCALE={args.scale:g}; {' '.join(args.tests)}")
    t0 = time.monotonic()
    proc = subprocess.run(
        [PYTHON, "manage.py", "test", "--noinput", "-v", "2", *args.tests], cwd=tree, env=env, check=False
    )
    seconds = time.monotonic() - t0
    for path in BENCH_DIR.glob(f"*{name}.sqlite3*"):
        path.unlink()
    outcome = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"\nfuzz {args.label} at scale {args.scale:g}: {outcome} in {seconds:,.0f} s")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
