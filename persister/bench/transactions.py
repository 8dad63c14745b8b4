"""The persisters' own view of a phase's transactions, from their `/metrics`.

A persist request's latency is its wait for its lane plus its transaction.
Each persister times every batch transaction from its first statement to
its COMMIT (`persister_db_transaction_seconds`); read before and after a
phase, the histogram says how many transactions the phase committed and how
many were slow, which tells a tail made by the database (every lane's
COMMIT stalling at once) from one made by queueing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

METRIC = "persister_db_transaction_seconds"
# A transaction slower than this counts as slow in the table.
SLOW_S = 0.1
READ_TIMEOUT_S = 2.0


class TransactionTimes(msgspec.Struct, frozen=True):
    """The pool's histogram: cumulative counts per upper bound (seconds)."""

    count: float
    total_s: float
    buckets: dict[float, float]


class TransactionReport(msgspec.Struct):
    transactions: int
    mean_ms: float | None
    # The smallest bucket bound that at least 99 % of them stayed under (ms);
    # None with no transaction, or if no finite bound holds 99 %.
    p99_under_ms: float | None
    # How many took longer than `slow_over_ms`: the smallest bucket bound
    # of at least SLOW_S.
    slow: int
    slow_over_ms: float | None
    # The highest bound the slowest one passed; None if all stayed under the first.
    slowest_over_ms: float | None


def parse(texts: Iterable[str]) -> TransactionTimes:
    """The histogram summed over every series of `/metrics` texts (one per persister)."""
    count = total = 0.0
    buckets: dict[float, float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name != METRIC:
                continue
            for sample in family.samples:
                if sample.name == f"{METRIC}_count":
                    count += sample.value
                elif sample.name == f"{METRIC}_sum":
                    total += sample.value
                elif sample.name == f"{METRIC}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return TransactionTimes(count, total, buckets)


async def read(session: aiohttp.ClientSession, urls: Iterable[str]) -> TransactionTimes:
    """The pool's histogram now (raises aiohttp.ClientError or TimeoutError)."""
    texts = []
    for url in urls:
        timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT_S)
        async with session.get(url, timeout=timeout) as answer:
            answer.raise_for_status()
            texts.append(await answer.text())
    return parse(texts)


def report(before: TransactionTimes, after: TransactionTimes) -> TransactionReport:
    """What the pool's persisters committed between two reads."""
    count = after.count - before.count
    total_s = after.total_s - before.total_s
    buckets = {b: value - before.buckets.get(b, 0.0) for b, value in after.buckets.items()}
    bounds = [b for b in sorted(buckets) if math.isfinite(b)]
    slow_bound = next((b for b in bounds if b >= SLOW_S), None)
    if count <= 0:
        return TransactionReport(0, None, None, 0, _ms(slow_bound), None)
    p99 = next((b for b in bounds if buckets[b] >= 0.99 * count), None)
    passed = [b for b in bounds if buckets[b] < count]
    return TransactionReport(
        transactions=round(count),
        mean_ms=total_s / count * 1000,
        p99_under_ms=_ms(p99),
        slow=round(count - buckets[slow_bound]) if slow_bound is not None else 0,
        slow_over_ms=_ms(slow_bound),
        slowest_over_ms=_ms(passed[-1]) if passed else None,
    )


def line(r: TransactionReport) -> str:
    """The table's line under a phase."""
    if r.transactions == 0 or r.mean_ms is None:
        return "persisters' transactions: none committed"
    parts = [f"persisters' transactions: {r.transactions}", f"mean {r.mean_ms:.1f} ms"]
    if r.p99_under_ms is not None:
        parts.append(f"p99 under {r.p99_under_ms:g} ms")
    if r.slow_over_ms is not None:
        parts.append(f"{r.slow} over {r.slow_over_ms:g} ms")
    if r.slowest_over_ms is not None:
        parts.append(f"the slowest over {r.slowest_over_ms:g} ms")
    return ", ".join(parts)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
