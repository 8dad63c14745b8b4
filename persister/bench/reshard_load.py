"""Resharding under load (issue 5): run a scenario, check it, measure it.

    python -m persister.bench.reshard_load --scenario grow-shrink --sharding rendezvous \\
        --duration 60

A scenario starts a pool of real `persister run` processes (`reshard_pool`),
sends the harness workload through `PersisterClient` with every room
always having a request in flight (closed loop, one sender per room), and
meanwhile applies timed steps: reshards (`persister reshard` itself, via
`persister.reshard.apply_change`), pins, SIGKILLs and restarts. A
`StreamReader` follows the stream throughout and a `ChannelAudit` notes
every announcement. Afterwards `reshard_audit.verify` checks the tables,
and the run reports:

- *gaps* and *pauses*: per room, at each step, the gap is the time between
  its last acknowledgement before the step ended and its first one after.
  With a request always in flight, a room's gap is about one request's
  latency when nothing happens (the *baseline*, measured away from steps);
  its *pause* is the gap minus the gap that covers a random instant away
  from steps (`covering_median`: a step falls in a longer gap than the
  median even when it changes nothing), the waiting the step added (for a
  moved room: the 421, the redirect and the new owner's first batch). Rooms
  that moved and rooms that did not are summed up separately, and beside
  them the *control*: the same figures at random instants away from steps
  (`control_gaps`), the noise of the machine.
- throughput (acknowledged events/s) before the first step, from the first
  step to one second after the last, and after;
- per reshard: rooms and stored events that changed owner, and the moved
  share (also over 100,000 synthetic room IDs, free of the sample's noise).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import math
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psycopg

from persister.bench import driver
from persister.bench.databases import DEFAULT_SERVER_URL
from persister.bench.reshard_audit import (
    ChannelAudit,
    Check,
    events_per_room,
    stored_rooms_moved,
    verify,
)
from persister.bench.reshard_pool import LivePool
from persister.bench.stats import percentile
from persister.bench.workload import BenchRequest, Workload, WorkloadSpec, generate
from persister.client import ClientOptions, PersisterClient
from persister.config import Config
from persister.errors import PersisterError
from persister.replication.reader import StreamReader
from persister.reshard import Change, apply_change, with_pin, with_writers, without_pin
from persister.sharding import Scheme, ShardMap, moved_rooms
from persister.storage.shard_map import load_shard_map
from persister.storage.streams import read_sequence_position

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
NAMES = ("persister1", "persister2", "persister3")
BUSIEST = "<busiest room>"  # a Pin/Unpin room placeholder, resolved per workload
CALL_DEADLINE_S = 30.0
READER_CATCH_UP_S = 20.0
SETTLE_S = 1.5  # load after the last step, at least
GAP_WINDOW_S = 2.0  # a room counts at a step if it was acknowledged this shortly before
SYNTHETIC_ROOMS = 100_000
CONTROL_SAMPLES = 40  # random instants per run for the control figures
CONTROL_MARGIN_S = 0.25  # kept clear of each quiet span's ends


# -- scenarios ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reshard:
    at_s: float
    writers: tuple[str, ...]


@dataclass(frozen=True)
class Pin:
    at_s: float
    instance: str
    room: str = BUSIEST


@dataclass(frozen=True)
class Unpin:
    at_s: float
    room: str = BUSIEST


@dataclass(frozen=True)
class Kill:
    at_s: float
    instance: str


@dataclass(frozen=True)
class Restart:
    at_s: float
    instance: str


Step = Reshard | Pin | Unpin | Kill | Restart


@dataclass(frozen=True)
class Scenario:
    name: str
    sharding: Scheme
    steps: tuple[Step, ...]
    duration_s: float  # of the load; every step falls inside it
    writers: tuple[str, ...] = NAMES[:2]  # epoch 1
    instances: tuple[str, ...] = NAMES  # all running from the start

    def describe(self, step: Step) -> str:
        if isinstance(step, Reshard):
            return f"reshard to {','.join(step.writers)}"
        if isinstance(step, Pin):
            return f"pin {step.room} to {step.instance}"
        if isinstance(step, Unpin):
            return f"unpin {step.room}"
        return f"{type(step).__name__.lower()} {step.instance}"


def scenario(name: str, sharding: Scheme, duration_s: float) -> Scenario:
    """The issue's scenarios, their steps spread over `duration_s`."""
    at = [duration_s * f for f in (0.25, 0.35, 0.5, 0.6, 0.75)]
    grow, shrink = Reshard(0, NAMES), Reshard(0, NAMES[:2])
    steps: tuple[Step, ...]
    if name == "grow-shrink":  # 2 -> 3 -> 2
        steps = (_at(grow, at[0]), _at(shrink, at[3]))
    elif name == "pin-unpin":  # the busiest room to the idle third writer and back
        steps = (Pin(at[0], NAMES[2]), Unpin(at[3]))
    elif name == "kill-reshard":
        # persister2 dies; its rooms move to a new writer while it is down
        # (so it leaves the readers' set only once a peer announced for it);
        # it comes back, owning nothing, and takes its place again.
        steps = (
            Kill(at[0], NAMES[1]),
            Reshard(at[1], (NAMES[0], NAMES[2])),
            Restart(at[2], NAMES[1]),
            _at(shrink, at[4]),
        )
    elif name == "no-move":
        # New epochs that move no room: rendezvous placement ignores the
        # order of the writer list. Every room is an unmoved room, so the
        # figures show what an epoch change alone costs them.
        sharding = "rendezvous"
        steps = (Reshard(at[0], (NAMES[1], NAMES[0])), Reshard(at[3], NAMES[:2]))
    else:
        raise ValueError(f"unknown scenario {name!r}")
    return Scenario(name, sharding, steps, duration_s)


def _at(step: Reshard, at_s: float) -> Reshard:
    return Reshard(at_s, step.writers)


def workload_for(duration_s: float, events_per_s: float, rooms: int, seed: int = 5) -> Workload:
    """Enough of the harness workload to keep `rooms` busy for `duration_s`
    at up to `events_per_s`. Rooms are equally large (Zipf exponent 0): in
    the closed loop every room sends at the same rate, one request at a
    time, so a smaller room would run dry early and stop being measured."""
    spec = WorkloadSpec(
        rooms=rooms,
        events=int(duration_s * events_per_s),
        batch=5,
        zipf_s=0.0,
        senders_busy=4,
        senders_quiet=2,
        busy_fraction=0.1,
        message_bytes=400,
        state_share=0.05,
        big_share=0.0,
        seed=seed,
        run_id=f"reshard{seed}",
    )
    return generate(spec, workers=min(4, os.cpu_count() or 1))


def busiest_room(workload: Workload) -> str:
    """The room with the most events (all rooms are about equally busy)."""
    counts = Counter(e.room_id for r in workload.requests for e in r.events)
    return counts.most_common(1)[0][0]


# -- load --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    room_id: str
    started: float
    done: float
    event_ids: tuple[str, ...]
    instance: str


@dataclass
class LoadRecorder:
    acks: list[Ack] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def acknowledged(self) -> list[str]:
        return [e for ack in self.acks for e in ack.event_ids]


async def drive(
    source: driver.RequestSource,
    client: PersisterClient,
    stop: asyncio.Event,
    senders: int,
    recorder: LoadRecorder,
) -> None:
    """Closed loop until `stop`: `senders` tasks, each sending the oldest
    ready request (a room's next request once its previous one is answered)."""

    async def sender() -> None:
        while not stop.is_set():
            request = source.take_ready()
            if request is None:
                if source.remaining == 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(source.released.wait(), 0.1)
                continue
            started = time.perf_counter()
            try:
                answer = await client.persist(
                    request.room_id, request.room_version, request.envelopes, request.backfilled
                )
            except PersisterError as exc:
                recorder.errors[driver.error_kind(exc)] += 1
            else:
                ids = tuple(r.event_id for r in answer.results)
                recorder.acks.append(
                    Ack(request.room_id, started, time.perf_counter(), ids,
                        answer.position.instance)
                )  # fmt: skip
            finally:
                source.release(request.room_id)

    await asyncio.gather(*(sender() for _ in range(senders)))


# -- steps -------------------------------------------------------------------------


@dataclass
class StepRecord:
    step: Step
    began: float
    ended: float
    before: ShardMap | None = None
    after: ShardMap | None = None


async def run_steps(
    scenario: Scenario, pool: LivePool, t0: float, busiest: str
) -> list[StepRecord]:
    """Each step at its time; a record spans exactly the step's own work."""
    records = []
    for step in scenario.steps:
        await asyncio.sleep(max(0.0, t0 + step.at_s - time.perf_counter()))
        if isinstance(step, Kill | Restart):
            began = time.perf_counter()
            await (pool.kill(step.instance) if isinstance(step, Kill) else
                   pool.restart(step.instance))  # fmt: skip
            records.append(StepRecord(step, began, time.perf_counter()))
            continue
        change = _change(pool.config, step, busiest)
        before = await _current_map(pool.database_url)
        began = time.perf_counter()
        await apply_change(pool.config, change)  # what `persister reshard` runs
        ended = time.perf_counter()
        after = await _current_map(pool.database_url)
        records.append(StepRecord(step, began, ended, before, after))
    return records


def _change(config: Config, step: Reshard | Pin | Unpin, busiest: str) -> Change:
    if isinstance(step, Reshard):
        return with_writers(config, list(step.writers))
    room = busiest if step.room == BUSIEST else step.room
    if isinstance(step, Pin):
        return with_pin(config, room, step.instance)
    return without_pin(room)


async def _current_map(database_url: str) -> ShardMap:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        current = await load_shard_map(conn)
    assert current is not None
    return current


# -- the stream reader, followed throughout ------------------------------------------


@dataclass
class ReaderWatch:
    """A map-following StreamReader's rows and minimum, as a consumer sees them."""

    reader: StreamReader
    start: int
    orderings: list[int] = field(default_factory=list)
    minima: list[int] = field(default_factory=list)
    writer_sets: list[frozenset[str]] = field(default_factory=list)

    async def consume(self) -> None:
        async with contextlib.aclosing(self.reader.rows()) as rows:
            async for row in rows:
                self.orderings.append(row.stream_ordering)

    async def watch(self) -> None:
        while True:
            self.minima.append(self.reader.complete_up_to())
            writers = self.reader.state.writers
            if not self.writer_sets or self.writer_sets[-1] != writers:
                self.writer_sets.append(writers)
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def watched_reader(pool: LivePool) -> AsyncIterator[ReaderWatch]:
    config = pool.config
    reader = StreamReader(
        config.redis.url, config.redis.channel, config.database.url,
        list(config.stream_writers.events),
    )  # fmt: skip
    await reader.start()
    watch = ReaderWatch(reader, reader.complete_up_to())
    tasks = [asyncio.create_task(watch.consume()), asyncio.create_task(watch.watch())]
    try:
        yield watch
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await reader.close()


async def check_reader(watch: ReaderWatch, database_url: str) -> Check:
    """Every stored event after its start, once, in order; the minimum never back."""
    check = Check("the reader delivers every event once, in order; its minimum never goes back")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        highest = await read_sequence_position(conn)
        if not await watch.reader.wait_for(highest, READER_CATCH_UP_S):
            check.fail(f"complete_up_to {watch.reader.complete_up_to()} never reached {highest}")
        deadline = time.perf_counter() + READER_CATCH_UP_S
        while watch.reader.state.delivered() < watch.reader.complete_up_to():
            if time.perf_counter() > deadline:
                check.fail("the consumer did not drain the reader")
                break
            await asyncio.sleep(0.05)
        cur = await conn.execute(
            "SELECT stream_ordering FROM events WHERE stream_ordering > %s"
            " AND stream_ordering <= %s ORDER BY stream_ordering",
            (watch.start, watch.reader.state.delivered()),
        )
        stored = [int(o) for (o,) in await cur.fetchall()]
    check.checked = len(stored)
    if watch.orderings != stored:
        missing = sorted(set(stored) - set(watch.orderings))[:10]
        extra = sorted(set(watch.orderings) - set(stored))[:10]
        check.fail(
            f"delivered {len(watch.orderings)} rows, stored {len(stored)}: "
            f"missing {missing}, unexpected {extra}, in order: "
            f"{watch.orderings == sorted(watch.orderings)}"
        )
    if watch.minima != sorted(watch.minima):
        back = next(i for i in range(1, len(watch.minima)) if watch.minima[i] < watch.minima[i - 1])
        check.fail(f"the minimum went back from {watch.minima[back - 1]} to {watch.minima[back]}")
    return check


# -- figures ---------------------------------------------------------------------------


class Gaps(msgspec.Struct):
    """Rooms' gaps in acknowledgements at a step (or, for the baseline, all
    consecutive gaps away from steps), in milliseconds."""

    rooms: int
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    # The gap minus the room's own median gap away from steps: the waiting
    # the step added. (A gap includes one ordinary request, which is
    # ~100 ms when this 2-core box is busy.)
    pause_p50_ms: float
    pause_p99_ms: float
    stalled: int  # rooms with work left and no acknowledgement after the step at all
    # From the step's end to each room's first acknowledgement after it: the
    # part of the gap the step is answerable for when the room was already
    # stalled (by a SIGKILL, say) before it began.
    resume_p99_ms: float


class StepFigures(msgspec.Struct):
    step: str
    at_s: float
    took_ms: float
    epoch: int | None
    rooms_stored: int
    rooms_moved: int
    moved_share: float | None
    events_moved: int
    moved: Gaps
    unmoved: Gaps


class Throughput(msgspec.Struct):
    before: float
    during: float
    after: float


class RunReport(msgspec.Struct):
    scenario: str
    sharding: str
    duration_s: float
    rooms: int
    events_acknowledged: int
    requests_acknowledged: int
    # Requests of the workload never sent: 0 means the load ran dry early.
    requests_left: int
    client_errors: dict[str, int]
    client_redirects: int
    throughput_events_per_s: Throughput
    baseline: Gaps
    # Pauses at random instants away from steps (`control_gaps`).
    control: Gaps
    steps: list[StepFigures]
    reader_writer_sets: list[list[str]]
    synthetic_moved_share_2_to_3: dict[str, float]
    checks: list[str]
    ok: bool


def _ms(ordered: Sequence[float], fraction: float) -> float:
    return round(percentile(ordered, fraction) * 1000, 1) if ordered else math.nan


def _gaps(
    values: Sequence[float | None], pauses: Sequence[float] = (), resumes: Sequence[float] = ()
) -> Gaps:
    done = sorted(v for v in values if v is not None)
    paused, resumed = sorted(pauses), sorted(resumes)
    return Gaps(
        rooms=len(done),
        gap_p50_ms=_ms(done, 0.5),
        gap_p99_ms=_ms(done, 0.99),
        gap_max_ms=_ms(done, 1.0),
        pause_p50_ms=_ms(paused, 0.5),
        pause_p99_ms=_ms(paused, 0.99),
        stalled=len(values) - len(done),
        resume_p99_ms=_ms(resumed, 0.99),
    )


def gaps_at(
    acks_by_room: dict[str, list[float]],
    typical: dict[str, float],
    rooms: Iterable[str],
    began: float,
    ended: float,
    finished: frozenset[str],
) -> Gaps:
    """Each active room's gap in acknowledgements around a step: from its
    last one before the step ended to its first one after; `typical` is
    each room's median gap away from steps, `finished` the rooms whose
    every request was acknowledged (`finished_rooms`)."""
    return _gaps(*_room_gaps(acks_by_room, typical, rooms, began, ended, finished))


def control_gaps(
    acks_by_room: dict[str, list[float]],
    typical: dict[str, float],
    quiet: Sequence[tuple[float, float]],
    finished: frozenset[str],
    samples: int = CONTROL_SAMPLES,
) -> Gaps:
    """`gaps_at` for every room at random instants away from steps: what a
    step that changes nothing would show, the noise a step's figures are
    read against. Seeded, so a run's report is reproducible from its acks."""
    rng = random.Random(7)
    spans = [(lo + CONTROL_MARGIN_S, hi - CONTROL_MARGIN_S) for lo, hi in quiet]
    spans = [(lo, hi) for lo, hi in spans if hi > lo]
    values: list[float | None] = []
    pauses: list[float] = []
    for _ in range(samples if spans else 0):
        lo, hi = rng.choice(spans)
        instant = rng.uniform(lo, hi)
        v, p, _ = _room_gaps(acks_by_room, typical, list(acks_by_room), instant, instant, finished)
        values += v
        pauses += p
    return _gaps(values, pauses)


def finished_rooms(
    requests: Sequence[BenchRequest], acks_by_room: dict[str, list[float]]
) -> frozenset[str]:
    """The rooms whose every request of the workload was acknowledged."""
    planned = Counter(request.room_id for request in requests)
    return frozenset(room for room, n in planned.items() if len(acks_by_room.get(room, ())) >= n)


def _room_gaps(
    acks_by_room: dict[str, list[float]],
    typical: dict[str, float],
    rooms: Iterable[str],
    began: float,
    ended: float,
    finished: frozenset[str],
) -> tuple[list[float | None], list[float], list[float]]:
    values: list[float | None] = []
    pauses, resumes = [], []
    for room in rooms:
        dones = acks_by_room.get(room, [])
        index = bisect.bisect_right(dones, ended)
        if index == 0 or dones[index - 1] < began - GAP_WINDOW_S:
            continue  # not sending just then
        if index == len(dones):
            if room not in finished:  # out of work is not stalled
                values.append(None)
            continue
        gap = dones[index] - dones[index - 1]
        values.append(gap)
        pauses.append(max(0.0, gap - typical.get(room, 0.0)))
        resumes.append(dones[index] - ended)
    return values, pauses, resumes


def quiet_gaps(
    acks_by_room: dict[str, list[float]], quiet: Sequence[tuple[float, float]]
) -> dict[str, list[float]]:
    """Per room, the gaps between consecutive acknowledgements inside the
    `quiet` spans (away from every step)."""
    gaps: dict[str, list[float]] = {}
    for room, dones in acks_by_room.items():
        gaps[room] = sorted(
            b - a
            for a, b in zip(dones, dones[1:], strict=False)
            if any(lo <= a and b <= hi for lo, hi in quiet)
        )
    return gaps


def covering_median(gaps: Sequence[float]) -> float:
    """The median length of the gap that covers a random instant.

    A step ends at an instant unrelated to a room's acknowledgements, and
    long gaps cover more instants than short ones, so the gap a step falls
    in is, even when the step changes nothing, longer than the median gap:
    gaps weigh by their length here, as they are met at random instants.
    """
    ordered = sorted(gaps)
    half = sum(ordered) / 2
    total = 0.0
    for gap in ordered:
        total += gap
        if total >= half:
            return gap
    return ordered[-1] if ordered else 0.0


def throughput(acks: Sequence[Ack], spans: Sequence[tuple[float, float]]) -> list[float]:
    rates = []
    for lo, hi in spans:
        events = sum(len(a.event_ids) for a in acks if lo <= a.done < hi)
        rates.append(round(events / (hi - lo), 1) if hi > lo else math.nan)
    return rates


def synthetic_moved_share() -> dict[str, float]:
    rooms = [f"!synthetic{i}:example.org" for i in range(SYNTHETIC_ROOMS)]
    shares: dict[str, float] = {}
    schemes: tuple[Scheme, ...] = ("sha256", "rendezvous")
    for scheme in schemes:
        before = ShardMap(1, NAMES[:2], scheme)
        after = ShardMap(2, NAMES, scheme)
        shares[scheme] = round(len(moved_rooms(rooms, before, after)) / len(rooms), 4)
    return shares


async def step_figures(
    scenario: Scenario,
    records: Sequence[StepRecord],
    acks_by_room: dict[str, list[float]],
    typical: dict[str, float],
    database_url: str,
    t0: float,
    finished: frozenset[str],
) -> list[StepFigures]:
    figures = []
    for record in records:
        rooms = list(acks_by_room)
        moved: set[str] = set()  # a kill or restart moves nothing
        stored: dict[str, int] = {}
        epoch = None
        if record.before is not None and record.after is not None:
            epoch = record.after.epoch
            stored = await events_per_room(database_url, record.after.start())
            moved = stored_rooms_moved(list(stored), record.before, record.after)
        unmoved = [r for r in rooms if r not in moved]
        figures.append(
            StepFigures(
                step=scenario.describe(record.step),
                at_s=round(record.began - t0, 2),
                took_ms=round((record.ended - record.began) * 1000, 1),
                epoch=epoch,
                rooms_stored=len(stored),
                rooms_moved=len(moved),
                moved_share=round(len(moved) / len(stored), 3) if stored else None,
                events_moved=sum(stored[r] for r in moved),
                moved=gaps_at(acks_by_room, typical, moved, record.began, record.ended, finished),
                unmoved=gaps_at(
                    acks_by_room, typical, unmoved, record.began, record.ended, finished
                ),
            )
        )
    return figures


# -- one run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    report: RunReport
    checks: list[Check]
    pool_exits: list[tuple[str, int | None]]


async def run_scenario(
    scenario: Scenario,
    workload: Workload,
    *,
    server_url: str,
    redis_url: str,
    folder: Path,
    follow_redis: bool = True,
    warmup_s: float = 1.0,
) -> RunResult:
    """Start a pool, load it while the steps run, verify, report; clean up."""
    busiest = busiest_room(workload)
    pool = await LivePool.start(
        server_url=server_url, redis_url=redis_url, folder=folder,
        instances=scenario.instances, writers=scenario.writers, sharding=scenario.sharding,
    )  # fmt: skip
    try:
        config = pool.config
        audit = ChannelAudit(config.redis.url, config.redis.channel, config.database.url)
        await audit.start()
        recorder = LoadRecorder()
        options = ClientOptions(deadline_s=CALL_DEADLINE_S, connections_per_host=64)
        rooms = {r.room_id for r in workload.requests}
        async with (
            PersisterClient.from_config(config, options=options) as client,
            watched_reader(pool) as watch,
        ):
            if follow_redis:
                await client.follow_redis(config.redis.url, config.redis.channel)
            t0 = time.perf_counter()
            source = driver.RequestSource(workload.requests)
            stop = asyncio.Event()
            load = asyncio.create_task(drive(source, client, stop, len(rooms), recorder))
            records = await run_steps(scenario, pool, t0 + warmup_s, busiest)
            # A slow step (a restart on a busy machine) must not end the load
            # before the rooms it affects had time to resume.
            until = max(t0 + warmup_s + scenario.duration_s, time.perf_counter() + SETTLE_S)
            await asyncio.sleep(until - time.perf_counter())
            stop.set()
            await load
            t_end = time.perf_counter()
            requests_left = source.remaining
            reader_check = await check_reader(watch, config.database.url)
            writer_sets = [sorted(s) for s in watch.writer_sets]
            redirects = client.stats.redirects
        await audit.stop()
        checks, _ = await verify(config.database.url, recorder.acknowledged(), audit)
        checks.append(reader_check)
        report = await _report(
            scenario, workload, records, recorder, checks, config.database.url,
            (t0 + warmup_s, t_end), writer_sets, redirects, requests_left,
        )  # fmt: skip
    finally:
        await pool.close()
    return RunResult(report, checks, pool.exits)


async def _report(
    scenario: Scenario,
    workload: Workload,
    records: Sequence[StepRecord],
    recorder: LoadRecorder,
    checks: Sequence[Check],
    database_url: str,
    span: tuple[float, float],
    writer_sets: list[list[str]],
    redirects: int,
    requests_left: int,
) -> RunReport:
    start, end = span
    acks_by_room: dict[str, list[float]] = defaultdict(list)
    for ack in sorted(recorder.acks, key=lambda a: a.done):
        acks_by_room[ack.room_id].append(ack.done)
    first = min((r.began for r in records), default=end)
    last = max((r.ended for r in records), default=start) + 1.0
    quiet_spans = [(start, first - 0.2), (last, end)]
    quiet = quiet_gaps(acks_by_room, quiet_spans)
    typical = {room: covering_median(gaps) for room, gaps in quiet.items() if gaps}
    before, during, after = throughput(recorder.acks, [(start, first), (first, last), (last, end)])
    # A room run dry before a step (a pinned room alone on its writer goes
    # fastest) shows no acknowledgement after it, as a stalled room does.
    finished = finished_rooms(workload.requests, acks_by_room)
    figures = await step_figures(
        scenario, records, acks_by_room, typical, database_url, start, finished
    )
    return RunReport(
        scenario=scenario.name,
        sharding=scenario.sharding,
        duration_s=scenario.duration_s,
        rooms=len(acks_by_room),
        events_acknowledged=len(recorder.acknowledged()),
        requests_acknowledged=len(recorder.acks),
        requests_left=requests_left,
        client_errors=dict(recorder.errors),
        client_redirects=redirects,
        throughput_events_per_s=Throughput(before, during, after),
        baseline=_gaps([g for gaps in quiet.values() for g in gaps]),
        control=control_gaps(acks_by_room, typical, quiet_spans, finished),
        steps=figures,
        reader_writer_sets=writer_sets,
        synthetic_moved_share_2_to_3=synthetic_moved_share(),
        checks=[str(c) for c in checks],
        ok=all(c.ok for c in checks),
    )


def format_report(report: RunReport) -> str:
    t = report.throughput_events_per_s
    lines = [
        f"scenario {report.scenario} ({report.sharding}), {report.duration_s:g} s of load over "
        f"{report.rooms} rooms: {report.events_acknowledged} events acknowledged, "
        f"errors {report.client_errors or 'none'}, {report.client_redirects} redirects",
        f"throughput events/s: before {t.before}, during {t.during}, after {t.after}",
        f"baseline gap (away from steps): p50 {report.baseline.gap_p50_ms} ms, "
        f"p99 {report.baseline.gap_p99_ms} ms over {report.baseline.rooms} gaps",
        f"control (random instants away from steps, what a step that changes nothing shows): "
        f"pause p50 {report.control.pause_p50_ms} p99 {report.control.pause_p99_ms} ms",
    ]
    for s in report.steps:
        lines.append(
            f"t={s.at_s:6.2f}s {s.step} (took {s.took_ms} ms, epoch {s.epoch}): "
            f"{s.rooms_moved}/{s.rooms_stored} rooms moved (share {s.moved_share}), "
            f"{s.events_moved} events moved"
        )
        for label, g in (("moved", s.moved), ("unmoved", s.unmoved)):
            lines.append(
                f"    {label:7} {g.rooms:3} rooms: pause p50 {g.pause_p50_ms} p99 "
                f"{g.pause_p99_ms} ms (gap p50 {g.gap_p50_ms} p99 {g.gap_p99_ms} max "
                f"{g.gap_max_ms} ms), resumed p99 {g.resume_p99_ms} ms after the step, "
                f"{g.stalled} stalled"
            )
    if report.requests_left == 0:
        lines.append("the workload ran dry before the load ended: the figures after it "
                     "measure nothing; raise --rate-hint")  # fmt: skip
    lines.append(f"reader writer sets: {report.reader_writer_sets}")
    lines.append(f"moved share 2->3 over {SYNTHETIC_ROOMS} synthetic rooms: "
                 f"{report.synthetic_moved_share_2_to_3}")  # fmt: skip
    lines += report.checks
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m persister.bench.reshard_load")
    parser.add_argument(
        "--scenario",
        default="grow-shrink",
        choices=["grow-shrink", "pin-unpin", "kill-reshard", "no-move"],
    )
    parser.add_argument("--sharding", default="rendezvous", choices=["sha256", "rendezvous"])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--rooms", type=int, default=64)
    parser.add_argument("--rate-hint", type=float, default=16000.0,
                        help="events/s the workload must last at")  # fmt: skip
    parser.add_argument("--no-follow-redis", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    folder = args.out or Path("bench/results") / time.strftime("reshard-%Y%m%d-%H%M%S")
    chosen = scenario(args.scenario, args.sharding, args.duration)
    workload = workload_for(args.duration + 2, args.rate_hint, args.rooms)
    result = asyncio.run(
        run_scenario(
            chosen,
            workload,
            server_url=os.environ.get("PERSISTER_DATABASE_URL") or DEFAULT_SERVER_URL,
            redis_url=os.environ.get("PERSISTER_REDIS_URL") or DEFAULT_REDIS_URL,
            folder=folder,
            follow_redis=not args.no_follow_redis,
        )
    )
    (folder / "reshard.json").write_bytes(msgspec.json.format(msgspec.json.encode(result.report)))
    print(format_report(result.report))
    print(f"\nresult: {folder / 'reshard.json'}; pool exits {result.pool_exits}")
    return 0 if result.report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
