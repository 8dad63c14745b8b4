"""Micro-benchmark of a writer's position bookkeeping (`persister.positions`).

Run: .venv/bin/python -m pytest bench/micro/test_bench_positions.py --benchmark-only -q

What one batch costs the lane on top of its transaction: open a fetch,
take the drawn orderings, ask for the position the batch will store, finish
them; here for two lanes whose batches overlap, as they do in a writer, so
that the unfinished orderings of one hold the other's position back.
"""

from __future__ import annotations

import itertools
from typing import Any

from persister.positions import WriterPositions

BATCH = 70  # events per batch at half load (bench/README.md)


def _two_lanes_of_batches(positions: WriterPositions, sequence: itertools.count[int]) -> int:
    first, second = positions.begin_fetch(), positions.begin_fetch()
    drawn_first = [next(sequence) for _ in range(BATCH)]
    drawn_second = [next(sequence) for _ in range(BATCH)]
    positions.end_fetch(first, drawn_first)
    positions.end_fetch(second, drawn_second)
    positions.position_if_finished(drawn_second)
    positions.finish(drawn_second)  # the later batch commits first
    positions.position_if_finished(drawn_first)
    positions.finish(drawn_first)
    return positions.position()


def test_bench_position_bookkeeping_of_two_overlapping_batches(benchmark: Any) -> None:
    announced: list[int] = []
    positions = WriterPositions("bench", 0, on_advance=announced.append)
    sequence = itertools.count(1)
    position = benchmark(_two_lanes_of_batches, positions, sequence)
    assert position == next(sequence) - 1  # every ordering drawn is finished
    assert announced == sorted(announced)
