"""bench/wake_cost.py: one row per sleep, each with the work's time and the CPU per iteration."""

from __future__ import annotations

import pytest

from persister.bench.wake_cost import GAPS_MS, main, measure


def test_both_figures_are_microseconds_of_a_real_run() -> None:
    wall_us, cpu_us = measure(0.0, 20)
    # Twenty decodes, encodes and hashes of 1.4 KB: tens of µs at least, never seconds.
    assert 1 < wall_us < 1e6 and 1 < cpu_us < 1e6


def test_every_sleep_gets_a_row_compared_with_the_work_back_to_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--iterations", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpuidle driver ")
    rows = lines[2:]
    assert [float(row.split()[0]) for row in rows] == list(GAPS_MS)
    assert rows[0].endswith("(work x1.00)")
