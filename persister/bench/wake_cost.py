"""What a wake-up costs on this machine (`python bench/wake_cost.py`).

The same small piece of Python work (decode, encode and hash a 1.4 KB JSON
object, twenty times) is timed back to back and then after sleeping a few
milliseconds before each run, as a process does that waits for the next
request. On a virtual machine whose idle vCPU halts (cpuidle driver
`haltpoll` with `guest_halt_poll_ns=0`, as on the machine of bench/README.md),
the work after a sleep runs much slower on cold caches, and the wake-up
itself costs CPU. A persister at a few thousand requests per second sleeps
between most of them, so this, not its code, sets most of its CPU per
request at light load (bench/README.md, tenth session).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

GAPS_MS = (0.0, 0.5, 2.0, 5.0, 20.0)
_DOCUMENT = msgspec.json.encode({f"key{i}": "v" * 40 for i in range(30)})


def work(repeats: int = 20) -> None:
    for _ in range(repeats):
        document = msgspec.json.decode(_DOCUMENT)
        hashlib.sha256(msgspec.json.encode(document)).digest()


def measure(gap_ms: float, iterations: int) -> tuple[float, float]:
    """(median wall time of the work, CPU per iteration including the
    wake-up), in µs, with `gap_ms` of sleep before each iteration."""
    walls: list[float] = []
    cpu_started = time.process_time()
    for _ in range(iterations):
        if gap_ms:
            time.sleep(gap_ms / 1000)
        started = time.perf_counter()
        work()
        walls.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_started
    return statistics.median(walls) * 1e6, cpu / iterations * 1e6


def idle_settings() -> str:
    """The kernel's cpuidle driver and halt-polling limit, where it says."""
    driver = _read(Path("/sys/devices/system/cpu/cpuidle/current_driver"))
    poll = _read(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns"))
    polling = f", guest_halt_poll_ns {poll}" if poll is not None else ""
    return f"cpuidle driver {driver or 'unknown'}{polling}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args(argv)
    print(idle_settings())
    print(f"{'sleep before':>12}  {'work, median':>12}  {'cpu per iteration':>17}")
    hot_wall = 0.0
    for gap_ms in GAPS_MS:
        wall_us, cpu_us = measure(gap_ms, args.iterations)
        hot_wall = hot_wall or wall_us
        print(
            f"{gap_ms:>9.1f} ms  {wall_us:>9.1f} µs  {cpu_us:>14.1f} µs"
            f"  (work x{wall_us / hot_wall:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
