"""Every Prometheus metric of a persister, in one place.

Each `Metrics` owns its CollectorRegistry instead of using prometheus_client's
global one, so that tests (and a process hosting several writers) can build
as many as they like without "Duplicated timeseries" errors. Names carry
their unit (`_seconds`, `_total`); `tests/unit/test_metrics.py` pins them,
because dashboards and alerts break silently when a name changes.

Every metric has an `instance` label (the persister's instance name), so a
pool's series stay apart even where Prometheus's own `instance` target label
is rewritten (see docs/operators.md on `honor_labels`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

TypeClass = Literal["message", "state", "other"]
TYPE_CLASSES: Final[tuple[TypeClass, ...]] = ("message", "state", "other")

# Event types that carry conversation; everything else without a state key
# (receipts-like EDUs never reach us) is "other".
MESSAGE_TYPES: Final = frozenset({"m.room.message", "m.room.encrypted", "m.sticker"})

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# Batches are capped by persist.max_batch_events (400 by default), or hold
# one request of up to persist.max_events_per_request (1000).
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# As Synapse's synapse_storage_events_forward_extremities_persisted.
_EXTREMITY_BUCKETS = (1, 2, 3, 5, 7, 10, 15, 20, 50, 100, 200, 500)


def type_class(event_type: str, state_key: str | None) -> TypeClass:
    """The `type_class` label of an event: state events first, then messages."""
    if state_key is not None:
        return "state"
    if event_type in MESSAGE_TYPES:
        return "message"
    return "other"


class Metrics:
    """The metric objects of one persister instance and the calls that feed them."""

    def __init__(
        self,
        instance: str,
        registry: CollectorRegistry | None = None,
        *,
        process_metrics: bool = True,
    ) -> None:
        self.instance = instance
        self.registry = registry if registry is not None else CollectorRegistry()
        if process_metrics:
            # CPU, memory and file descriptors: what a load run compares per writer.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._define_events_metrics()
        self._define_request_metrics()
        self._define_stream_metrics()

    def _define_events_metrics(self) -> None:
        labels = ("instance",)
        self.events_persisted = Counter(
            "persister_events_persisted",
            "Events committed (duplicates excluded), by type class.",
            ("instance", "type_class"),
            registry=self.registry,
        )
        self.batch_events = Histogram(
            "persister_batch_events",
            "Events per committed database transaction.",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.forward_extremities = Histogram(
            "persister_forward_extremities",
            "Forward extremities of each room after a commit touched it.",
            labels,
            buckets=_EXTREMITY_BUCKETS,
            registry=self.registry,
        )
        self.batches = Counter(
            "persister_batches",
            "Committed batch transactions, by round trips: 1 when planned from what the "
            "lane remembers of its rooms, 2 when loaded.",
            ("instance", "round_trips"),
            registry=self.registry,
        )
        self.db_transaction_seconds = Histogram(
            "persister_db_transaction_seconds",
            "Time to run and commit one batch transaction.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Series present from the start, so rate() works before the first event.
        for cls in TYPE_CLASSES:
            self.events_persisted.labels(self.instance, cls)
        self._batches = {trips: self.batches.labels(self.instance, str(trips)) for trips in (1, 2)}
        for histogram in (self.batch_events, self.forward_extremities, self.db_transaction_seconds):
            histogram.labels(self.instance)

    def _define_request_metrics(self) -> None:
        self.requests = Counter(
            "persister_requests",
            "Persist API requests answered, by HTTP status.",
            ("instance", "status"),
            registry=self.registry,
        )
        self.persist_latency_seconds = Histogram(
            "persister_persist_latency_seconds",
            "From a persist request's arrival to its 200 answer (after commit).",
            ("instance",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Children kept: `labels()` per request was ~1 % of a single-event
        # persister's CPU.
        self._persist_latency = self.persist_latency_seconds.labels(self.instance)
        self._requests_by_status: dict[int, Counter] = {}

    def _define_stream_metrics(self) -> None:
        self.queue_depth_events = Gauge(
            "persister_queue_depth_events",
            "Events accepted but not yet committed.",
            ("instance",),
            registry=self.registry,
        )
        self.stream_position = Gauge(
            "persister_stream_position",
            "The last position this instance announced on the events stream.",
            ("instance",),
            registry=self.registry,
        )
        self.queue_depth_events.labels(self.instance).set(0)
        # No position series until one is announced: a 0 would drag down
        # any min() over the pool that a dashboard takes.

    # -- what the writer and the HTTP layer call ---------------------------

    def batch_committed(
        self,
        n_events: int,
        by_type_class: Mapping[str, int],
        seconds: float,
        extremity_counts: Iterable[int],
        round_trips: int = 2,
    ) -> None:
        """One transaction committed `n_events` new events in `seconds`.

        `by_type_class` counts them per `type_class()`; `extremity_counts`
        has one entry per room the batch touched; `round_trips` is 1 or 2
        (0: a transaction settled after its connection was lost).
        """
        if round_trips in self._batches:
            self._batches[round_trips].inc()
        for cls, count in by_type_class.items():
            if cls not in TYPE_CLASSES:
                # A free-form label would grow the series without bound.
                raise ValueError(f"unknown type_class {cls!r}; expected one of {TYPE_CLASSES}")
            if count:
                self.events_persisted.labels(self.instance, cls).inc(count)
        self.batch_events.labels(self.instance).observe(n_events)
        self.db_transaction_seconds.labels(self.instance).observe(seconds)
        extremities = self.forward_extremities.labels(self.instance)
        for count in extremity_counts:
            extremities.observe(count)

    def request_finished(self, status: int, seconds: float) -> None:
        requests = self._requests_by_status.get(status)
        if requests is None:
            requests = self._requests_by_status[status] = self.requests.labels(
                self.instance, str(status)
            )
        requests.inc()
        # Only successes: a 421 or 503 answers at once and would make
        # persisting look faster than it is.
        if status == 200:
            self._persist_latency.observe(seconds)

    def set_queue_depth(self, n_events: int) -> None:
        self.queue_depth_events.labels(self.instance).set(n_events)

    def set_position(self, position: int) -> None:
        self.stream_position.labels(self.instance).set(position)

    def render(self) -> bytes:
        """The text exposition for `GET /metrics`; serve it with `CONTENT_TYPE`."""
        return generate_latest(self.registry)
