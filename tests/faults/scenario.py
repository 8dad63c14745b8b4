"""One fault scenario: a pool under load, watched, with a fault script run
in the middle, then judged.

    async with Scenario(folder, database_url, redis_url, instances=2) as s:
        await s.run(seconds=20, fault=my_fault_script)   # load + fault, then drain
        verdict = await s.finish()                       # stop the pool, check everything

What runs meanwhile: a `ChannelRecorder` and a `ReaderWatch` (see
`watchers`), a `HealthWatch` polling every member's /health, the harness's
workload through the retrying client, and a `Prober` that sends its own
requests without the client's retries, recording each raw answer (status,
Retry-After, how long it took) so that "503 rather than a hang" can be
asserted. Every attempt is bounded by `Prober.bound_s`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from persister import client as client_mod
from persister import wire
from persister.bench.workload import BenchRequest, Workload
from persister.replication.reader import StreamReader
from tests.faults import checks
from tests.faults.fleet import Fleet, write_config
from tests.faults.load import Deadline, Ledger, drive, workload
from tests.faults.watchers import ChannelRecorder, ReaderWatch, watching

DRAIN_TIMEOUT_S = 180.0
CATCH_UP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Health:
    at: float
    instance: str
    status: int | None  # None: no answer within a second


class HealthWatch:
    def __init__(self, fleet: Fleet, interval_s: float = 0.1) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self.seen: list[Health] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            while watching(started):  # or until cancelled
                for name in self.fleet.names:
                    status = await self.fleet.health(name, session)
                    self.seen.append(Health(time.time(), name, status))
                await asyncio.sleep(self.interval_s)

    def between(self, instance: str, start: float, end: float) -> list[int | None]:
        return [h.status for h in self.seen if h.instance == instance and start <= h.at < end]

    def first_ok_after(self, instance: str, start: float) -> float | None:
        return next(
            (
                h.at
                for h in self.seen
                if h.instance == instance and h.at >= start and h.status == 200
            ),
            None,
        )


@dataclass(frozen=True)
class Answer:
    sent: float
    took: float
    instance: str
    status: int | None  # None: no answer within the bound, or the connection failed
    retry_after: str | None
    errcode: str | None


@dataclass
class Prober:
    """Sends requests of its own rooms one at a time, each room in order,
    straight to the owner: no retries but its own (a refused request is
    sent again after `pause_s`), every raw answer recorded."""

    client: client_mod.PersisterClient
    fleet: Fleet
    requests: list[BenchRequest]
    ledger: Ledger
    rooms_at_once: int = 4
    bound_s: float = 10.0
    pause_s: float = 0.1  # after a refusal, and between requests of one lane
    answers: list[Answer] = field(default_factory=list)

    async def run(self, until: Deadline) -> None:
        by_room: dict[str, list[BenchRequest]] = {}
        for r in self.requests:
            by_room.setdefault(r.room_id, []).append(r)
        rooms = list(by_room.values())
        headers = {"Authorization": f"Bearer {self.fleet.config.secret()}",
                   "Content-Type": "application/json"}  # fmt: skip
        async with aiohttp.ClientSession(headers=headers) as session:
            lanes = [rooms[i :: self.rooms_at_once] for i in range(self.rooms_at_once)]
            await asyncio.gather(*(self._rooms(session, lane, until) for lane in lanes))

    async def _rooms(
        self, session: aiohttp.ClientSession, rooms: list[list[BenchRequest]], until: Deadline
    ) -> None:
        for room in rooms:
            for request in room:
                if until.passed():
                    return
                # Resending is safe (duplicates); a room's order is kept by
                # never moving on before an acknowledgement. The retry
                # count is bounded by the client's patience.
                for _ in range(int(120 / self.pause_s)):
                    acknowledged = await self._attempt(session, request)
                    await asyncio.sleep(self.pause_s)
                    if acknowledged:
                        break
                else:
                    self.ledger.failures.append(f"probe request {request.seq} never acknowledged")

    async def _attempt(self, session: aiohttp.ClientSession, request: BenchRequest) -> bool:
        owner = self.client.owner_of(request.room_id)
        location = self.fleet.config.location(owner)
        url = client_mod.persist_url(location.host, location.port, request.room_id)
        body = client_mod.encode_request(
            request.room_version, request.envelopes, request.backfilled
        )
        self.ledger.sent_events.update(e.event_id for e in request.events)
        sent = time.time()
        status = retry_after = errcode = None
        try:
            async with session.post(
                url, data=body, timeout=aiohttp.ClientTimeout(total=self.bound_s)
            ) as answer:
                payload = await answer.read()
                status, retry_after = answer.status, answer.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError):
            pass
        took = time.time() - sent
        if status == 200:
            decoded = wire.response_decoder.decode(payload)
            self.ledger.record(request, list(decoded.results), decoded.position.instance)
        elif status is not None:
            try:
                errcode = msgspec.json.decode(payload, type=wire.ErrorBody).errcode
            except msgspec.DecodeError:
                errcode = "(not JSON)"
        self.answers.append(Answer(sent, took, owner, status, retry_after, errcode))
        return status == 200

    def problems(self) -> list[str]:
        """Only 200 or 503-with-Retry-After, each within the bound."""
        out = []
        if odd := [a for a in self.answers if a.status not in (200, 503)]:
            out.append(f"{len(odd)} probe answers neither 200 nor 503: {odd[:5]}")
        if bare := [a for a in self.answers if a.status == 503 and not a.retry_after]:
            out.append(f"{len(bare)} 503 answers without Retry-After: {bare[:5]}")
        if hung := [a for a in self.answers if a.took >= self.bound_s]:
            out.append(f"{len(hung)} probe requests unanswered after {self.bound_s} s: {hung[:5]}")
        return out


Fault = Callable[["Scenario"], Awaitable[None]]


class Scenario:
    def __init__(
        self,
        folder: Path,
        database_url: str,
        redis_url: str,
        *,
        instances: int = 2,
        seconds_hint: float = 30.0,
        rooms: int = 80,
        concurrency: int = 16,
        rate: float | None = 1500.0,
        hooked: bool = False,
        config: Mapping[str, Any] | None = None,
        client_options: client_mod.ClientOptions | None = None,
    ) -> None:
        names = [f"p{i + 1}" for i in range(instances)]
        path = write_config(folder, database_url, redis_url, names, config)
        self.fleet = Fleet(folder, path, hooked=hooked)
        self.database_url = database_url
        self.config = self.fleet.config
        run = secrets.token_hex(3)
        # Enough for `seconds_hint` at `rate` (and the prober's ~80 events/s),
        # with a margin: a scenario that runs out of work tests nothing.
        events = int((rate or 3000.0) * seconds_hint * 1.5)
        self.work: Workload = workload(events, rooms, f"load{run}", workers=2)
        self.probe_work: Workload = workload(
            int(120 * seconds_hint), 12, f"probe{run}", seed=11, batch=2
        )
        self.concurrency = concurrency
        self.rate = rate
        self.client_options = client_options or client_mod.ClientOptions(
            request_timeout_s=10.0, deadline_s=120.0, backoff_max_s=1.0
        )
        self.ledger = Ledger()
        self.recorder = ChannelRecorder(self.config.redis.url, self.config.redis.channel)
        self.health = HealthWatch(self.fleet)
        self.watch: ReaderWatch | None = None
        self.client: client_mod.PersisterClient | None = None
        self.prober: Prober | None = None

    @property
    def requests(self) -> list[BenchRequest]:
        return self.work.requests + self.probe_work.requests

    async def __aenter__(self) -> Scenario:
        try:
            await self.recorder.start()
            await self.fleet.start_all()
            self.watch = ReaderWatch(
                StreamReader(
                    self.config.redis.url, self.config.redis.channel, self.database_url,
                    self.fleet.names,
                ),
                self.database_url,
            )  # fmt: skip
            await self.watch.start()
            self.health.start()
            self.client = client_mod.PersisterClient.from_config(
                self.config, options=self.client_options
            )
            self.prober = Prober(self.client, self.fleet, self.probe_work.requests, self.ledger)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def run(self, fault: Fault, *, seconds: float | None = None, tail_s: float = 1.0) -> None:
        """Load with `fault(self)` running alongside, for `seconds`, or if None
        until the fault script is done and `tail_s` more; then let every
        request already taken finish."""
        assert self.client is not None and self.prober is not None
        until = Deadline(time.time() + (seconds if seconds is not None else DRAIN_TIMEOUT_S * 10))
        load = asyncio.gather(
            drive(self.client, self.work.requests, self.ledger, concurrency=self.concurrency,
                  until=until, rate=self.rate),
            self.prober.run(until),
        )  # fmt: skip
        try:
            await fault(self)
            if seconds is None:
                await asyncio.sleep(tail_s)
                until.at = time.time()
        except BaseException:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
            raise
        await asyncio.wait_for(load, DRAIN_TIMEOUT_S)

    async def finish(self) -> checks.Verdict:
        """Wait for the reader to catch up, stop the pool, judge what happened."""
        assert self.watch is not None and self.prober is not None
        problems: list[str] = []
        stored_max = (await checks.load_stored(self.database_url)).max_ordering()
        if not await self.watch.caught_up(stored_max, CATCH_UP_TIMEOUT_S):
            reader = self.watch.reader
            problems.append(
                f"reader not caught up with {stored_max} after {CATCH_UP_TIMEOUT_S} s: "
                f"complete_up_to={reader.complete_up_to()} {reader.positions()}"
            )
        codes = await self.fleet.stop_all()
        if bad := {name: code for name, code in codes.items() if code != 0}:
            problems.append(f"SIGTERM did not end every member with 0: {bad}")
        await asyncio.sleep(0.2)  # the last announcements reach the recorder
        await self.watch.close()
        await self.recorder.close()
        stored = await checks.load_stored(self.database_url)
        seen = (self.watch.rows, self.watch.samples, self.watch.reader.state.delivered())
        verdict = checks.judge(self.ledger, self.requests, stored, self.recorder.heard, seen)
        verdict.problems[:0] = problems + self.prober.problems()
        return verdict

    async def close(self) -> None:
        await self.health.close()
        if self.watch is not None:
            await self.watch.close()
        await self.recorder.close()
        if self.client is not None:
            await self.client.close()
        self.fleet.close()

    def acknowledged_between(self, start: float, end: float) -> int:
        return self.ledger.acknowledged_between(start, end)
