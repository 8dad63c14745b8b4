"""Micro-benchmark of DAG linking per batch: `persister.dag.link_batch`.

Run: .venv/bin/python -m pytest bench/micro/test_bench_dag.py --benchmark-only -q
A batch is 1000 events of 50 rooms (Zipf activity, forks and merges, from
the load harness's generator), cut into requests of 10 events. Two cases:
new rooms (an empty view) and rooms with history (a view holding the
rooms' earlier events and forward extremities), the steady state. Divide
the mean by 1000 for the cost per event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from persister.bench.workload import WorkloadSpec, generate, prepared
from persister.dag import LinkRequest, StoredEvent, StoredView, link_batch

BATCH_EVENTS = 1000


def _link_requests(events: int) -> list[LinkRequest]:
    spec = WorkloadSpec(rooms=50, events=events, batch=10, seed=3, message_bytes=300)
    return [
        LinkRequest(r.room_id, r.room_version, r.backfilled, [prepared(e) for e in r.events])
        for r in generate(spec).requests
    ]


def _first_events(
    requests: list[LinkRequest], count: int
) -> tuple[list[LinkRequest], list[LinkRequest]]:
    """Split at the request that reaches `count` events."""
    total = 0
    for index, request in enumerate(requests):
        total += len(request.events)
        if total >= count:
            return requests[: index + 1], requests[index + 1 :]
    return requests, []


def _empty_view() -> StoredView:
    return StoredView(
        events={},
        room_versions={},
        forward_extremities={},
        backward_extremities=set(),
        referenced=set(),
    )


def _view_after(history: list[LinkRequest]) -> Callable[[], StoredView]:
    """A factory of views as the database would hold them after `history`."""
    view = _empty_view()
    link_batch(view, history)
    events = {
        k: StoredEvent(v.room_id, v.outlier, v.rejected, i + 1, v.depth)
        for i, (k, v) in enumerate(view.events.items())
    }

    def fresh() -> StoredView:
        # link_batch updates the view it is given, so every round gets a copy.
        return StoredView(
            events=dict(events),
            room_versions=dict(view.room_versions),
            forward_extremities={r: set(f) for r, f in view.forward_extremities.items()},
            backward_extremities=set(view.backward_extremities),
            referenced=set(view.referenced),
        )

    return fresh


@pytest.fixture(scope="module")
def batches() -> tuple[list[LinkRequest], list[LinkRequest]]:
    requests = _link_requests(2 * BATCH_EVENTS)
    first, rest = _first_events(requests, BATCH_EVENTS)
    second, _ = _first_events(rest, BATCH_EVENTS)
    return first, second


def _bench(benchmark: Any, view_factory: Callable[[], StoredView], batch: list[LinkRequest]) -> Any:
    return benchmark.pedantic(
        link_batch, setup=lambda: ((view_factory(), batch), {}), rounds=200, warmup_rounds=5
    )


def test_bench_link_batch_1000_events_50_new_rooms(benchmark: Any, batches: Any) -> None:
    first, _ = batches
    plan = _bench(benchmark, _empty_view, first)
    assert len(plan.new_events) >= BATCH_EVENTS
    assert len({room for room, _ in plan.forward_added}) == len(plan.new_rooms)


def test_bench_link_batch_1000_events_50_rooms_with_history(benchmark: Any, batches: Any) -> None:
    first, second = batches
    plan = _bench(benchmark, _view_after(first), second)
    assert len(plan.new_events) >= BATCH_EVENTS
    assert not plan.new_rooms
    assert plan.forward_removed  # the new events replace stored extremities
