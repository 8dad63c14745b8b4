"""Load for fault tests: the harness's workload, sent through the retrying client.

`drive` sends a workload's requests in order per room, `concurrency` rooms
at a time, through `persister.client.PersisterClient` (which retries
connection errors, timeouts and 503s until its deadline), and stops taking
new requests at `until`. Every answer goes into a `Ledger`: what was
acknowledged, with which ordering, when, and whether it was new.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from persister.bench.driver import RequestSource
from persister.bench.workload import BenchRequest, Workload, WorkloadSpec, generate
from persister.client import ClientOptions, PersisterClient
from persister.config import Config
from persister.errors import PersisterError
from persister.wire import EventResult

# Retry until acknowledged: a persister killed mid-request comes back in a
# few seconds; the deadline is only there so that a broken run ends.
PATIENT = ClientOptions(request_timeout_s=10.0, deadline_s=120.0, backoff_max_s=1.0)


@dataclass
class Deadline:
    """When the load stops taking new requests; may be moved while it runs."""

    at: float

    def passed(self) -> bool:
        return time.time() >= self.at


@dataclass
class Ledger:
    """Everything the persisters acknowledged, as the event creator saw it."""

    # event_id -> every result returned for it (a retried request whose first
    # answer was lost, or a resend, adds duplicates)
    results: dict[str, list[EventResult]] = field(default_factory=dict)
    sent_events: set[str] = field(default_factory=set)
    requests_ok: int = 0
    failures: list[str] = field(default_factory=list)
    # (wall time of the answer, events acknowledged, the instance that answered)
    answers: list[tuple[float, int, str]] = field(default_factory=list)

    def record(self, request: BenchRequest, results: list[EventResult], instance: str) -> None:
        self.requests_ok += 1
        self.answers.append((time.time(), len(results), instance))
        for result in results:
            self.results.setdefault(result.event_id, []).append(result)

    @property
    def acknowledged(self) -> set[str]:
        return set(self.results)

    def acknowledged_between(self, start: float, end: float) -> int:
        return sum(n for t, n, _ in self.answers if start <= t < end)

    def first_answer_after(self, instance: str, start: float) -> float | None:
        return next((t for t, _, i in self.answers if i == instance and t >= start), None)

    def new_answers_per_event(self) -> Counter[int]:
        """How many answers said `duplicate: false`, per event: must be 1 each."""
        return Counter(sum(not r.duplicate for r in rs) for rs in self.results.values())


def workload(
    events: int,
    rooms: int,
    run_id: str,
    *,
    seed: int = 7,
    workers: int = 1,
    batch: int = 8,
    zipf_s: float = 1.0,
) -> Workload:
    """A mixed workload: forks and merges, some backfill, some resent requests,
    three room versions (v1's own event IDs, v10, v12's derived room IDs)."""
    spec = WorkloadSpec(
        rooms=rooms, events=events, batch=batch, zipf_s=zipf_s, senders_busy=4, big_share=0.001,
        backfill_share=0.05, resend_share=0.03, room_versions=("10", "1", "12"),
        seed=seed, run_id=run_id,
    )  # fmt: skip
    return generate(spec, workers=workers)


def client_for(config: Config, options: ClientOptions = PATIENT) -> PersisterClient:
    return PersisterClient.from_config(config, options=options)


async def drive(
    client: PersisterClient,
    requests: list[BenchRequest],
    ledger: Ledger,
    *,
    concurrency: int,
    until: Deadline,
    rate: float | None = None,
) -> None:
    """Send until every request is done or `until` passed, at most `rate`
    events/s if given; requests already taken are always finished
    (acknowledged or failed)."""
    source = RequestSource(requests)
    pace = Pace(rate)

    async def sender() -> None:
        while not until.passed():
            request = source.take_ready()
            if request is None:
                if source.remaining == 0:
                    return
                await _wait_briefly(source.released)
                continue
            try:
                await pace.wait(len(request.events))
                await _send(client, request, ledger)
            finally:
                source.release(request.room_id)

    await asyncio.gather(*(sender() for _ in range(concurrency)))


class Pace:
    """Spaces sends so that events leave at `rate` per second on average."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._next = time.monotonic()

    async def wait(self, events: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + events / self.rate
        if slot > now:
            await asyncio.sleep(slot - now)


async def _send(client: PersisterClient, request: BenchRequest, ledger: Ledger) -> None:
    ledger.sent_events.update(e.event_id for e in request.events)
    try:
        response = await client.persist(
            request.room_id, request.room_version, request.envelopes, request.backfilled
        )
    except PersisterError as exc:
        ledger.failures.append(f"request {request.seq} ({request.room_id}): {exc}")
        return
    ledger.record(request, list(response.results), response.position.instance)


async def _wait_briefly(event: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=0.1)
    except TimeoutError:
        pass
