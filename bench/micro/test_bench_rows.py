"""Micro-benchmarks of preparing a batch's rows for the write transaction.

Run: .venv/bin/python -m pytest bench/micro/test_bench_rows.py --benchmark-only -q
The batch is 1000 events of 50 rooms, planned by `dag.link_batch` (see
test_bench_dag.py). Measured without a database:

- `events_txn.write_command`: every column list the write builds, encoded
  as the parameters the lane sends (`persister.storage.pipeline`);
- `events_txn._add_columns`, the rows-to-columns transposition it uses;
- psycopg's dumping of the `event_json` columns as text vs binary arrays:
  text arrays escape every quote of the JSON with a regex, binary arrays
  copy bytes (ceiling.py uses binary, `%b`, for that reason); and the same
  columns dumped as the lane binds them (`persister.storage.arrays`);
- the writer lane's bookkeeping around a batch (`_batch_ids`, `_result`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from psycopg.adapt import PyFormat, Transformer

from persister.bench.workload import WorkloadSpec, generate, prepared
from persister.dag import BatchPlan, LinkRequest, StoredView, link_batch
from persister.storage import arrays, events_txn
from persister.writer import lane
from persister.writer.queue import PendingRequest


@pytest.fixture(scope="module")
def requests() -> list[LinkRequest]:
    spec = WorkloadSpec(rooms=50, events=1000, batch=10, seed=3, message_bytes=1024)
    return [
        LinkRequest(r.room_id, r.room_version, r.backfilled, [prepared(e) for e in r.events])
        for r in generate(spec).requests
    ]


@pytest.fixture(scope="module")
def plan(requests: list[LinkRequest]) -> BatchPlan:
    view = StoredView(
        events={},
        room_versions={},
        forward_extremities={},
        backward_extremities=set(),
        referenced=set(),
    )
    return link_batch(view, requests)


def test_bench_write_plan_rows_1000_events(benchmark: Any, plan: BatchPlan) -> None:
    orderings = list(range(1, len(plan.new_events) + 1))

    def write() -> int:
        command = events_txn.write_command(plan, orderings, plan.new_rooms, "persister1", 0, 1)
        return len(command.values)

    # Every table is written by one statement, bound once.
    assert benchmark(write) == len(events_txn.WRITE_STATEMENT.params)


def test_bench_columns_of_edges(benchmark: Any, plan: BatchPlan) -> None:
    params: dict[str, Any] = {}
    names = ("edge_events", "edge_prevs", "edge_rooms")
    benchmark(events_txn._add_columns, params, names, plan.edges)
    assert len(params["edge_events"]) == len(plan.edges)


def _json_columns(plan: BatchPlan) -> list[list[str]]:
    events = plan.new_events
    return [
        [e.event_id for e in events],
        [e.room_id for e in events],
        [e.json for e in events],
        ["10"] * len(events),
    ]


@pytest.mark.parametrize("fmt", [PyFormat.TEXT, PyFormat.BINARY], ids=["text", "binary"])
def test_bench_dump_event_json_arrays(benchmark: Any, plan: BatchPlan, fmt: PyFormat) -> None:
    params = _json_columns(plan)
    transformer = Transformer()
    dumped = benchmark(transformer.dump_sequence, params, [fmt] * len(params))
    assert all(value is not None for value in dumped)


def test_bench_dump_event_json_typed_arrays(benchmark: Any, plan: BatchPlan) -> None:
    # What the lane sends (persister.storage.pipeline binds these), against
    # the `binary` case above: the same columns, typed.
    params = [arrays.TextArray(column) for column in _json_columns(plan)]
    dumped = benchmark(lambda: [arrays.dump_text_array(column) for column in params])
    assert all(value is not None for value in dumped)


def _pending(requests: list[LinkRequest]) -> list[PendingRequest]:
    loop = asyncio.new_event_loop()
    try:
        return [
            PendingRequest(r, 1024 * len(r.events), loop.create_future(), time.monotonic())
            for r in requests
        ]
    finally:
        loop.close()


def test_bench_lane_batch_ids(benchmark: Any, requests: list[LinkRequest]) -> None:
    rooms, event_ids, _ = benchmark(lane._batch_ids, _pending(requests))
    assert len(rooms) <= 50 and len(event_ids) >= 1000


def test_bench_lane_results_of_1000_events(benchmark: Any, plan: BatchPlan) -> None:
    # The answers built after COMMIT, one EventResult per event.
    assigned = {e.event_id: i + 1 for i, e in enumerate(plan.new_events)}
    outcomes = [o for group in plan.outcomes if isinstance(group, list) for o in group]

    def results() -> int:
        return len([lane._result(o, assigned) for o in outcomes])

    assert benchmark(results) == len(outcomes)
