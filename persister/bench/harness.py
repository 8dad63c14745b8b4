"""`persister bench`: load a persister pool with a Matrix-like workload.

    python bench/run.py --duration 20 --batch 50          # starts its own pool
    python bench/run.py --config shared.yaml              # an existing pool

Order of a run: generate the workload (before any timing), start a pool
unless `--config` names one, run the phases, check that every acknowledged
event is stored once, stop the pool, run the bare ceiling on a fresh
database with as many of the same rows as the run wrote (`--no-ceiling`
skips it), then write `result.json`, `chart.png` and print the table.
All traffic goes to the configured instances and database (127.0.0.1 for a
pool the harness starts); every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psycopg
import yarl

from persister.bench import checks, cpu, driver, options, report, stats, transactions, wal
from persister.bench.ceiling import CeilingReport, CeilingRow, run_ceiling
from persister.bench.databases import (
    DEFAULT_SERVER_URL,
    bench_database_name,
    create_database,
    drop_database,
)
from persister.bench.lag import LagTracker, PositionReader
from persister.bench.pool import BenchPool, PoolSettings, PoolStartError, start_pool
from persister.bench.progress import Progress
from persister.bench.workload import Workload, WorkloadSpec, generate
from persister.client import ClientOptions, PersisterClient
from persister.config import Config, load_config
from persister.errors import PersisterError
from persister.storage.migrate import database_name, with_database

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The open loop never has more requests outstanding than this.
OPEN_MAX_IN_FLIGHT = 2048
LAG_FLUSH_S = 2.0
CALL_DEADLINE_S = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="persister bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    options.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.mode == "open" and args.rate is None:
        parser.error("--mode open needs --rate")
    try:
        return run_async(run(args, list(sys.argv if argv is None else argv)))
    except KeyboardInterrupt:
        # The pool was stopped and its database dropped on the way out.
        print("persister bench: interrupted", file=sys.stderr)
        return 130
    except (PoolStartError, PersisterError, psycopg.OperationalError, OSError) as exc:
        print(f"persister bench: {exc}", file=sys.stderr)
        return 1


def run_async(coro: Any) -> int:
    # uvloop, when installed, leaves more of the shared CPU to the persister.
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


# -- the run ------------------------------------------------------------------


@dataclass
class Target:
    config: Config
    pids: dict[str, list[int]]
    database: str
    started: bool


async def run(args: argparse.Namespace, command: list[str]) -> int:
    progress = Progress()
    folder = args.out or Path("bench/results") / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    workloads = [await _generate(args, options.spec_from_args(args), progress)]
    if args.mode == "both":
        # The open phase gets rooms and events of its own. What a closed loop
        # leaves of a workload is mostly the busiest rooms' backlog (a room's
        # requests go one at a time), so an open loop over the rest would
        # measure that queue in the client, not the pool.
        spec = replace(workloads[0].spec, run_id=f"{workloads[0].spec.run_id}-open")
        workloads.append(await _generate(args, spec, progress))
    generation_s = time.perf_counter() - started
    _freeze_workload()
    async with _target(args, folder, progress) as target:
        if args.harness_nice:
            # After the pool started: its processes keep the usual priority.
            os.nice(args.harness_nice)
        result = await _load(args, command, workloads, generation_s, target, progress)
    if args.ceiling:
        # After the run, with the pool stopped, and as many rows as it wrote.
        rows = args.ceiling_events or _events_written(result)
        result = _with_ceiling(result, await _ceiling(args, workloads, rows, progress))
    report.write_json(result, folder / "result.json")
    charted = report.chart(result, folder / "chart.png")
    print(report.table(result))
    print(
        f"\nresult: {folder / 'result.json'}"
        + (f", chart: {folder / 'chart.png'}" if charted else "")
    )
    return 0 if result.verification is None or result.verification.ok else 1


def _freeze_workload() -> None:
    """Keep the workload out of the cyclic collector's scans. Its objects
    live for the whole run, and each full collection over them stopped the
    loop for 40-70 ms: a pause during a phase counts as persist latency."""
    gc.collect()
    gc.freeze()


def _server_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return str(args.database_url)
    if args.config:
        return with_database(load_config(args.config).database.url, "postgres")
    return os.environ.get("PERSISTER_DATABASE_URL") or DEFAULT_SERVER_URL


async def _generate(args: argparse.Namespace, spec: WorkloadSpec, progress: Progress) -> Workload:
    progress.message(f"generating {spec.events} event slots in {spec.rooms} rooms...")
    started = time.perf_counter()
    workload = await asyncio.to_thread(generate, spec, args.gen_workers)
    progress.message(
        f"generated {workload.summary.events_unique} events, "
        f"{workload.summary.requests} requests in {time.perf_counter() - started:.1f}s"
    )
    return workload


def _events_written(result: report.RunResult) -> int:
    if result.verification is not None:
        return result.verification.acknowledged_events
    return sum(phase.new_events for phase in result.phases)


def _with_ceiling(result: report.RunResult, ceiling: CeilingReport) -> report.RunResult:
    best = ceiling.ceiling_events_per_s
    phases = [
        msgspec.structs.replace(p, ratio_to_ceiling=p.new_events_per_s / best if best else None)
        for p in result.phases
    ]
    return msgspec.structs.replace(result, ceiling=ceiling, phases=phases)


async def _ceiling(
    args: argparse.Namespace, workloads: list[Workload], count: int, progress: Progress
) -> CeilingReport:
    """The same rows as the run wrote (the first `count` the workloads send),
    so that the bare writes meet tables as large as the run's."""
    rows = [
        CeilingRow(e, r.room_version, r.backfilled)
        for workload in workloads
        for r in workload.requests
        if not r.resend
        for e in r.events
    ][:count]
    server = _server_url(args)
    name = bench_database_name("_ceiling")
    progress.message(f"ceiling: {len(rows)} rows into {name}...")
    url = await create_database(server, name)
    try:
        return await asyncio.to_thread(run_ceiling, url, rows, max_seconds=args.ceiling_seconds)
    finally:
        await drop_database(server, name)


@contextlib.asynccontextmanager
async def _target(
    args: argparse.Namespace, folder: Path, progress: Progress
) -> AsyncIterator[Target]:
    if args.config:
        config = load_config(args.config)
        pids = {
            name: cpu.listening_pids(config.location(name).port)
            for name in config.stream_writers.events
        }
        yield Target(config, pids, database_name(config.database.url), started=False)
        return
    settings = PoolSettings(
        server_url=_server_url(args),
        redis_url=args.redis_url or os.environ.get("PERSISTER_REDIS_URL") or DEFAULT_REDIS_URL,
        instances=args.instances,
        folder=folder,
        extra_configs=list(args.persister_config),
    )
    progress.message(f"starting {args.instances} persister(s)...")
    pool = await start_pool(settings)
    try:
        yield Target(pool.config, pool.pids, pool.database_name, started=True)
    finally:
        await _stop_pool(args, pool, settings.server_url, progress)


async def _stop_pool(
    args: argparse.Namespace, pool: BenchPool, server: str, progress: Progress
) -> None:
    codes = await pool.stop()
    progress.message(f"pool stopped, exit codes {codes}")
    if not args.keep_db:
        await drop_database(server, pool.database_name)


# -- phases -------------------------------------------------------------------


@dataclass
class PhasePlan:
    name: str
    mode: str
    concurrency: int | None
    rate: float | None


async def _load(
    args: argparse.Namespace,
    command: list[str],
    workloads: list[Workload],
    generation_s: float,
    target: Target,
    progress: Progress,
) -> report.RunResult:
    config = target.config
    start_ordering = await checks.max_ordering(config.database.url)
    # One source per workload; a phase takes the next, the last one repeats.
    sources = [driver.RequestSource(workload.requests) for workload in workloads]
    workload = workloads[0]
    # A call gives up after CALL_DEADLINE_S, so a phase ends at most that
    # long after its deadline, however slow the pool.
    options = ClientOptions(
        connections_per_host=max(64, min(args.concurrency, 512)), deadline_s=CALL_DEADLINE_S
    )
    if not args.coalesce:
        options = dataclasses.replace(options, coalesce_max_events=0)
    options = dataclasses.replace(
        options,
        batch_max_requests=args.batch_max_requests,
        max_small_exchanges=args.max_small_exchanges,
        small_exchange_bytes=args.small_exchange_bytes,
    )
    phases: list[report.PhaseResult] = []
    acknowledged: set[str] = set()
    async with (
        PersisterClient.from_config(config, options=options) as client,
        _reader(config) as reader,
    ):
        tracker = LagTracker(reader)
        lag_task = asyncio.create_task(tracker.run())
        try:
            for plan in _phase_plans(args, phases):
                run = _PhaseRun(args, plan, target, client, tracker, progress)
                source = sources[min(len(phases), len(sources) - 1)]
                phases.append(await run.execute(source, offset=_offset(phases)))
                acknowledged |= run.recorder.acknowledged
                if phases[-1].new_events == 0 and source.remaining == 0:
                    progress.message(
                        f"phase {plan.name} measured nothing: the workload ran out during "
                        "its warm-up (raise --events or lower --warmup)"
                    )
                elif source.remaining == 0 and plan.mode == "closed":
                    progress.message(
                        f"phase {plan.name}: the workload ran out before the phase's end; "
                        "its last seconds had only the busiest rooms left to send to, so "
                        "its events/s reads low (raise --events)"
                    )
        finally:
            lag_task.cancel()
    if args.mode == "both" and len(phases) == 1:
        progress.message("open phase skipped: the closed phase measured no throughput to halve")
    return report.RunResult(
        version=1,
        command=command,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=await checks.machine(config.database.url),
        workload_spec=asdict(workload.spec),
        workload=workload.summary,
        generation_s=generation_s,
        pool={
            "instances": len(config.stream_writers.events),
            "started": target.started,
            "database": target.database,
            "writers": list(config.stream_writers.events),
        },
        ceiling=None,  # measured after the run
        phases=phases,
        batch_sizes=await checks.batch_sizes(config.database.url, start_ordering),
        verification=await checks.verify(config.database.url, acknowledged, target.started),
    )


def _phase_plans(args: argparse.Namespace, done: list[report.PhaseResult]) -> Iterator[PhasePlan]:
    """Yields lazily: the open phase of `both` needs the closed phase's rate."""
    if args.mode in ("closed", "both"):
        yield PhasePlan("closed", "closed", args.concurrency, None)
    if args.mode == "open":
        yield PhasePlan("open", "open", None, float(args.rate))
    if args.mode == "both" and done and done[-1].new_events_per_s > 0:
        rate = done[-1].new_events_per_s * args.open_fraction
        yield PhasePlan(f"open@{args.open_fraction:g}", "open", None, rate)


def _offset(phases: list[report.PhaseResult]) -> float:
    if not phases or not phases[-1].timeline:
        return 0.0
    return phases[-1].timeline[-1].t_s + 1.0


class _PhaseRun:
    """One phase: drive the load, watch CPU, report progress, sum up."""

    def __init__(
        self,
        args: argparse.Namespace,
        plan: PhasePlan,
        target: Target,
        client: PersisterClient,
        tracker: LagTracker,
        progress: Progress,
    ) -> None:
        self.args, self.plan, self.target = args, plan, target
        self.client, self.tracker, self.progress = client, tracker, progress
        now = time.perf_counter()
        self.recorder = stats.PhaseRecorder(now, now + args.warmup)
        self.stop = driver.StopRule(now + args.duration, args.max_events, self.recorder)
        self.meter = cpu.CpuMeter(target.pids, target.database)
        self.meter_started = False
        self.wal_before: wal.WalCounters | None = None
        self.transactions_before: transactions.TransactionTimes | None = None
        self.metrics_urls = [
            str(yarl.URL.build(scheme="http", host=loc.host, port=loc.port, path="/metrics"))
            for loc in target.config.instance_map.values()
        ]

    async def execute(self, source: driver.RequestSource, offset: float) -> report.PhaseResult:
        self.progress.message(
            f"phase {self.plan.name}: {self.args.duration:g}s ({self.args.warmup:g}s warm-up)"
        )
        client_before = self.client.stats.snapshot()
        async with (
            await psycopg.AsyncConnection.connect(
                self.target.config.database.conninfo(), autocommit=True
            ) as server,
            aiohttp.ClientSession() as http,
        ):
            watcher = asyncio.create_task(self._watch(server, http))
            try:
                await self._drive(source)
                await self.tracker.flush(LAG_FLUSH_S)
            finally:
                watcher.cancel()
                self.progress.done()
            if not self.meter_started:
                await self._start_meters(server, http)
            cpu_report = self.meter.stop(max(time.perf_counter(), self.recorder.last_done))
            wal_after = await wal.read_counters(server)
            transactions_after = await self._read_transactions(http)
        wal_report = None
        if self.wal_before is not None and wal_after is not None:
            wal_report = wal.report(self.wal_before, wal_after, self.recorder.new_events)
        transactions_report = None
        if self.transactions_before is not None and transactions_after is not None:
            transactions_report = transactions.report(self.transactions_before, transactions_after)
        client = _client_delta(client_before, self.client)
        return self._result(offset, cpu_report, wal_report, transactions_report, client)

    async def _start_meters(
        self, server: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
    ) -> None:
        self.meter.start(time.perf_counter())
        self.meter_started = True
        self.wal_before = await wal.read_counters(server)
        self.transactions_before = await self._read_transactions(http)

    async def _read_transactions(
        self, http: aiohttp.ClientSession
    ) -> transactions.TransactionTimes | None:
        """None if a persister's `/metrics` cannot be read: the phase goes on without."""
        try:
            return await transactions.read(http, self.metrics_urls)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.progress.message(f"cannot read the persisters' /metrics: {exc!r}")
            return None

    async def _drive(self, source: driver.RequestSource) -> None:
        def on_answer(done: float, response: Any) -> None:
            self.tracker.note(done, response, self.recorder.record_lag)

        if self.plan.mode == "closed":
            assert self.plan.concurrency is not None
            await driver.run_closed(
                source, self.client, self.stop, self.plan.concurrency, on_answer
            )
        else:
            assert self.plan.rate is not None
            await driver.run_open(
                source,
                self.client,
                self.stop,
                self.plan.rate,
                OPEN_MAX_IN_FLIGHT,
                on_answer,
                random.Random(self.args.seed),
                drain_s=CALL_DEADLINE_S,
            )

    async def _watch(
        self, server: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
    ) -> None:
        """Progress line and CPU samples, twice a second."""
        while True:
            now = time.perf_counter()
            if not self.meter_started and now >= self.recorder.measured_from:
                await self._start_meters(server, http)
            elif self.meter_started:
                await asyncio.to_thread(self.meter.sample)
            self.progress.update(self.plan.name, self.recorder, self.stop.acknowledged, now)
            await asyncio.sleep(0.5)

    def _result(
        self,
        offset: float,
        cpu_report: cpu.CpuReport,
        wal_report: wal.WalReport | None,
        transactions_report: transactions.TransactionReport | None,
        client: dict[str, int],
    ) -> report.PhaseResult:
        r = self.recorder
        seconds = r.measured_seconds()
        new_rate = r.new_events / seconds if seconds > 0 else 0.0
        return report.PhaseResult(
            name=self.plan.name,
            mode=self.plan.mode,
            concurrency=self.plan.concurrency,
            target_events_per_s=self.plan.rate,
            offset_s=offset,
            warmup_s=self.args.warmup,
            measured_s=seconds,
            requests=r.requests,
            events=r.events,
            new_events=r.new_events,
            events_per_s=r.events_per_s(),
            new_events_per_s=new_rate,
            events_per_s_by_instance={k: v / seconds for k, v in r.by_instance.items()}
            if seconds
            else {},
            ratio_to_ceiling=None,  # known once the ceiling is measured, after the run
            latency_ms=stats.summarise(r.latencies),
            stream_lag_ms=stats.summarise(r.lags),
            lag_unseen=self.tracker.unseen,
            errors=dict(r.errors),
            request_sizes=dict(r.request_sizes),
            client=client,
            cpu=cpu_report,
            timeline=r.timeline(offset),
            wal=wal_report,
            transactions=transactions_report,
            send_delay_ms=stats.summarise(r.send_delays) if self.plan.mode == "open" else None,
        )


def _client_delta(before: Any, client: PersisterClient) -> dict[str, int]:
    after = client.stats
    return {
        name: getattr(after, name) - getattr(before, name)
        for name in (
            "attempts",
            "retries",
            "redirects",
            "timeouts",
            "connection_errors",
            "unavailable",
            "coalesced",
            "coalesced_refused",
            "batched",
            "batched_refused",
        )
    }


@contextlib.asynccontextmanager
async def _reader(config: Config) -> AsyncIterator[PositionReader]:
    from persister.replication.reader import StreamReader

    reader = StreamReader(
        config.redis.url,
        config.redis.channel,
        config.database.url,
        list(config.stream_writers.events),
    )
    await reader.start()
    try:
        yield reader
    finally:
        await reader.close()
