"""`make bench` runs bench/micro: it must not rot between benchmark runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_micro_benchmark_runs_once_without_error() -> None:
    # --benchmark-disable: each benchmarked call runs once, as a plain test.
    command = [sys.executable, "-m", "pytest", "bench/micro", "--benchmark-disable", "-q"]
    done = subprocess.run(
        [*command, "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
