"""What a phase measured: one record per request, summed up at the end.

Times are `time.perf_counter()` seconds. A request counts in the figures
only if it was *intended* to start after the warm-up; its latency runs from
that intended start (the send time in closed loop, the schedule in open
loop) to its answer, so a stalled persister shows as latency, not as fewer
samples (no coordinated omission).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

REQUEST_SIZE_BUCKETS = (1, 2, 10, 50, 100, 500, 1000)


class Percentiles(msgspec.Struct):
    samples: int
    p50: float
    p95: float
    p99: float
    p999: float
    max: float
    mean: float


class TimelinePoint(msgspec.Struct):
    t_s: float
    events_per_s: float
    # None: nothing was answered (or seen) in that second.
    p99_ms: float | None
    lag_p99_ms: float | None


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarise(values: Sequence[float], scale: float = 1000.0) -> Percentiles:
    """Percentiles of `values` (seconds), reported in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return Percentiles(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Percentiles(
        samples=len(ordered),
        p50=percentile(ordered, 0.50) * scale,
        p95=percentile(ordered, 0.95) * scale,
        p99=percentile(ordered, 0.99) * scale,
        p999=percentile(ordered, 0.999) * scale,
        max=ordered[-1] * scale,
        mean=sum(ordered) / len(ordered) * scale,
    )


def size_bucket(events: int) -> str:
    """ "1", "2-9", "10-49", ... "1000+": the request-size histogram's keys."""
    for low, high in zip(REQUEST_SIZE_BUCKETS, REQUEST_SIZE_BUCKETS[1:], strict=False):
        if events < high:
            return str(low) if high - low == 1 else f"{low}-{high - 1}"
    return f"{REQUEST_SIZE_BUCKETS[-1]}+"


@dataclass
class _Second:
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)


@dataclass
class PhaseRecorder:
    """Collects one phase's requests; `measured_from` ends the warm-up."""

    started: float
    measured_from: float
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    # Open loop: how long after its scheduled time each call left the harness.
    send_delays: list[float] = field(default_factory=list)
    events: int = 0
    new_events: int = 0
    requests: int = 0
    # New (not duplicate) events per answering instance.
    by_instance: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    request_sizes: Counter[str] = field(default_factory=Counter)
    last_done: float = 0.0
    seconds: dict[int, _Second] = field(default_factory=dict)
    # Every acknowledged event ID, warm-up included, for the final check.
    acknowledged: set[str] = field(default_factory=set)

    def record_ok(
        self, intended: float, done: float, event_ids: Sequence[str], new: int, instance: str
    ) -> None:
        self.acknowledged.update(event_ids)
        second = self._second(done)
        second.events += len(event_ids)
        second.latencies.append(done - intended)
        if intended < self.measured_from:
            return
        self.latencies.append(done - intended)
        self.events += len(event_ids)
        self.new_events += new
        self.requests += 1
        self.by_instance[instance] += new
        self.request_sizes[size_bucket(len(event_ids))] += 1
        self.last_done = max(self.last_done, done)

    def record_error(self, intended: float, done: float, kind: str) -> None:
        self._second(done)
        if intended >= self.measured_from:
            self.errors[kind] += 1
            self.last_done = max(self.last_done, done)

    def record_send_delay(self, intended: float, sent: float) -> None:
        """An open-loop call left the harness at `sent`, scheduled for
        `intended`. The delay is already part of the call's latency; kept
        apart, it shows how much of that latency the harness itself added
        (a busy event loop, or the in-flight cap)."""
        if intended >= self.measured_from:
            self.send_delays.append(max(0.0, sent - intended))

    def record_lag(self, answered: float, seen: float) -> None:
        lag = max(0.0, seen - answered)
        self._second(answered).lags.append(lag)
        if answered >= self.measured_from:
            self.lags.append(lag)

    def measured_seconds(self) -> float:
        return max(0.0, self.last_done - self.measured_from)

    def events_per_s(self) -> float:
        seconds = self.measured_seconds()
        return self.events / seconds if seconds > 0 else 0.0

    def timeline(self, offset: float) -> list[TimelinePoint]:
        """One point per second of the phase; `offset` shifts t for charts."""
        points = []
        # Seconds without a single answer are stalls: they must show as 0.
        for index in range(max(self.seconds, default=-1) + 1):
            second = self.seconds.get(index) or _Second()
            lags = sorted(second.lags)
            latencies = sorted(second.latencies)
            points.append(
                TimelinePoint(
                    t_s=offset + index,
                    events_per_s=float(second.events),
                    p99_ms=percentile(latencies, 0.99) * 1000 if latencies else None,
                    lag_p99_ms=percentile(lags, 0.99) * 1000 if lags else None,
                )
            )
        return points

    def recent(self, now: float) -> tuple[int, float]:
        """Events and p99 latency (ms) of the last whole second, for progress."""
        second = self.seconds.get(int(now - self.started) - 1)
        if second is None:
            return 0, math.nan
        return second.events, percentile(sorted(second.latencies), 0.99) * 1000

    def _second(self, when: float) -> _Second:
        index = max(0, int(when - self.started))
        found = self.seconds.get(index)
        if found is None:
            found = self.seconds[index] = _Second()
        return found
