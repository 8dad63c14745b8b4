"""The phase's transactions as the persisters' own histograms tell them.

The histograms here are real ones: a persister's `Metrics`, fed as a lane
feeds it and rendered as `GET /metrics` serves it.
"""

from __future__ import annotations

from persister.bench.transactions import TransactionReport, line, parse, report
from persister.metrics import Metrics


def _persister(name: str, seconds: list[float]) -> Metrics:
    metrics = Metrics(name, process_metrics=False)
    for duration in seconds:
        metrics.batch_committed(10, {"message": 10}, duration, [1])
    return metrics


def _read(metrics: Metrics) -> str:
    return metrics.render().decode()


def test_a_phase_counts_only_the_transactions_committed_between_the_reads() -> None:
    one, two = _persister("bench1", [0.004] * 50), _persister("bench2", [0.003] * 20)
    before = parse([_read(one), _read(two)])
    for duration in [0.004] * 97 + [0.03, 0.3, 0.6]:
        one.batch_committed(10, {"message": 10}, duration, [1])
    two.batch_committed(10, {"message": 10}, 0.002, [1])
    after = parse([_read(one), _read(two)])
    found = report(before, after)
    assert found.transactions == 101
    assert found.slow == 2 and found.slow_over_ms == 100
    assert found.slowest_over_ms == 500  # 0.6 s passed the 0.5 s bound, not 1 s
    assert found.p99_under_ms == 500
    assert found.mean_ms is not None and abs(found.mean_ms - 13.0) < 0.1


def test_most_transactions_under_a_bound_put_the_p99_there() -> None:
    metrics = _persister("bench1", [])
    before = parse([_read(metrics)])
    for _ in range(200):
        metrics.batch_committed(10, {"message": 10}, 0.007, [1])
    metrics.batch_committed(10, {"message": 10}, 0.2, [1])
    found = report(before, parse([_read(metrics)]))
    assert (found.transactions, found.p99_under_ms, found.slow) == (201, 10, 1)
    assert line(found) == (
        "persisters' transactions: 201, mean 8.0 ms, p99 under 10 ms, 1 over 100 ms, "
        "the slowest over 100 ms"
    )


def test_a_phase_without_transactions_says_so() -> None:
    metrics = _persister("bench1", [0.01])
    times = parse([_read(metrics)])
    found = report(times, times)
    assert found == TransactionReport(0, None, None, 0, 100, None)
    assert line(found) == "persisters' transactions: none committed"


def test_other_metrics_of_the_text_are_ignored() -> None:
    times = parse([_read(_persister("bench1", [0.01, 0.02]))])
    assert times.count == 2 and abs(times.total_s - 0.03) < 1e-9
    assert times.buckets[0.01] == 1 and times.buckets[float("inf")] == 2
