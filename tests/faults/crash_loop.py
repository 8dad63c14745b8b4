"""The crash-loop tool: load a persister pool while SIGKILLing its members.

    .venv/bin/python -m tests.faults.crash_loop --seconds 300     # the long form
    (tests/faults/test_crash_loop.py runs it briefly in CI)

A pool of `--instances` hooked persisters (`hooked_persister`) runs on a
private PostgreSQL cluster (commit timestamps on) and a Redis channel of its
own. The harness's workload goes through the retrying client until every
request it took is acknowledged. Meanwhile a killer SIGKILLs members, in
turn at each of these moments, and restarts them:

    external        at a random moment (random delays between kills)
    mid_batch       rows written, COMMIT not sent           (hook)
    mid_commit      0-3 ms after the batch, around COMMIT   (hook + delay)
    after_commit    committed, not answered, not published  (hook)
    before_publish  answered, its announcement not yet out  (hook)
    deputy          while announcing for a dead peer        (hook; the peer
                    is killed to make it announce)
    startup         0.05-1 s into a restart
    two_at_once     two members at once

Afterwards (see `checks`): every acknowledged event stored exactly once,
with the ordering it was acknowledged with, every request all-or-nothing;
the DAG tables equal an independent model; every announcement heard on the
channel kept the promise (no event of that writer at or below it committed
later, by the server's commit timestamps; its rows exactly the writer's
events in (prev, pos]); a StreamReader running throughout never saw the
stream grow below its complete_up_to, and handed out every event once, in
order; each process's own positions never went down, and each restart began
at or above everything announced for its instance before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from persister.bench.workload import BenchRequest
from persister.replication.reader import StreamReader
from persister.storage.migrate import MAINTENANCE_DB, migrate
from tests.faults import checks
from tests.faults.fleet import Fleet, write_config
from tests.faults.hooked_persister import HOOKS
from tests.faults.load import Deadline, Ledger, client_for, drive, workload
from tests.faults.servers import PrivatePostgres
from tests.faults.watchers import ChannelRecorder, ReaderWatch

MODES = ("external", "mid_batch", "mid_commit", "after_commit", "before_publish", "deputy",
         "startup", "two_at_once")  # fmt: skip
HOOK_WAIT_S = 3.0  # an armed hook not reached by then: kill from outside
EXTRA_KILLING_S = 60.0
EXIT_WAIT_S = 5.0
DRAIN_TIMEOUT_S = 180.0
CATCH_UP_TIMEOUT_S = 15.0


@dataclass
class CrashSettings:
    seconds: float
    folder: Path
    instances: int = 3
    rooms: int = 120
    concurrency: int = 24
    # Workload slots; the load stops at `seconds` or when they run out.
    events: int = 40_000
    rate: float | None = 1500.0  # events/s offered
    seed: int = 1
    # Layered over the pool's config, e.g. {"persist": {"commit_in_draw_order": True}}.
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class CrashReport:
    seconds: float
    kills: dict[str, int] = field(default_factory=dict)  # by mode
    hooks_fired: dict[str, int] = field(default_factory=dict)
    kills_total: int = 0
    restart_s_max: float = 0.0
    verdict: checks.Verdict = field(default_factory=checks.Verdict)

    @property
    def problems(self) -> list[str]:
        return self.verdict.problems


async def run_crash_loop(
    settings: CrashSettings, server: PrivatePostgres, redis_url: str
) -> CrashReport:
    database = f"persister_crash_{secrets.token_hex(4)}"
    database_url = server.url(database)
    await migrate(database_url)
    names = [f"crash{i + 1}" for i in range(settings.instances)]
    config_path = write_config(settings.folder, database_url, redis_url, names, settings.config)
    fleet = Fleet(settings.folder, config_path, hooked=True)
    try:
        return await _run(settings, fleet, database_url)
    finally:
        fleet.close()
        _drop_database(server, database)


async def _run(settings: CrashSettings, fleet: Fleet, database_url: str) -> CrashReport:
    report = CrashReport(settings.seconds)
    config = fleet.config
    work = workload(
        settings.events,
        settings.rooms,
        f"crash{secrets.token_hex(3)}",
        seed=settings.seed,
        workers=2,
    )
    recorder = ChannelRecorder(config.redis.url, config.redis.channel)
    await recorder.start()
    ledger = Ledger()
    watch: ReaderWatch | None = None
    try:
        await fleet.start_all()
        watch = ReaderWatch(
            StreamReader(config.redis.url, config.redis.channel, database_url, fleet.names),
            database_url,
        )
        await watch.start()
        until = time.time() + settings.seconds
        rng = random.Random(settings.seed)
        # The load lasts as long as the killer, who may need a little longer
        # than `seconds` to have killed in every way once.
        load_until = Deadline(until + EXTRA_KILLING_S)
        async with client_for(config) as client:
            load = asyncio.create_task(
                drive(
                    client,
                    work.requests,
                    ledger,
                    concurrency=settings.concurrency,
                    until=load_until,
                    rate=settings.rate,
                )
            )
            try:
                await _killer(fleet, until, rng, report)
            finally:
                load_until.at = time.time()
            await asyncio.wait_for(load, DRAIN_TIMEOUT_S)
        stored_max = await _max_ordering(database_url)
        if not await watch.caught_up(stored_max, CATCH_UP_TIMEOUT_S):
            report.problems.append(
                f"reader not caught up with {stored_max} after {CATCH_UP_TIMEOUT_S} s: "
                f"complete_up_to={watch.reader.complete_up_to()} {watch.reader.positions()}"
            )
        codes = await fleet.stop_all()
        if bad := {name: code for name, code in codes.items() if code != 0}:
            report.problems.append(f"SIGTERM did not end every member with 0: {bad}")
        await asyncio.sleep(0.2)  # the last announcements reach the recorder
    finally:
        if watch is not None:
            await watch.close()
        await recorder.close()
    stored = await checks.load_stored(database_url)
    _judge(report, fleet, ledger, work.requests, stored, recorder, watch)
    return report


async def _killer(fleet: Fleet, until: float, rng: random.Random, report: CrashReport) -> None:
    """Kill in turn in each of MODES until `until` (and at least once in each,
    taking up to EXTRA_KILLING_S more), restarting the dead each time."""
    kills: Counter[str] = Counter()
    turn = 0
    while time.time() < until or (turn < len(MODES) and time.time() < until + EXTRA_KILLING_S):
        await asyncio.sleep(rng.uniform(0.2, 1.2))
        mode = MODES[turn % len(MODES)]
        turn += 1
        dead = await _kill(fleet, mode, rng, kills)
        for name in dead:
            if await fleet.wait_exit(name, EXIT_WAIT_S) is None:
                raise RuntimeError(f"{name} still runs {EXIT_WAIT_S} s after SIGKILL")
            kills[mode] += 1
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        for name in dead:
            report.restart_s_max = max(report.restart_s_max, await fleet.start(name))
    report.kills = dict(kills)
    report.kills_total = sum(kills.values())


async def _kill(fleet: Fleet, mode: str, rng: random.Random, kills: Counter[str]) -> list[str]:
    """Kill one or two members the way `mode` says; returns who is dead."""
    victim = rng.choice(fleet.names)
    others = [n for n in fleet.names if n != victim]
    if mode in HOOKS and mode != "deputy":
        fleet.arm(victim, mode)
        if await fleet.wait_exit(victim, HOOK_WAIT_S) is None:
            fleet.kill(victim)  # the hook was not reached in time
        return [victim]
    if mode == "deputy":
        # Killing a peer makes the others announce for it; the armed one
        # dies holding the peer's fence, its position row half-updated.
        peer = rng.choice(others)
        fleet.arm(victim, "deputy")
        fleet.kill(peer)
        if await fleet.wait_exit(victim, HOOK_WAIT_S) is None:
            fleet.kill(victim)  # another peer was the deputy this time
        return [peer, victim]
    if mode == "startup":
        fleet.kill(victim)
        await fleet.wait_exit(victim, EXIT_WAIT_S)
        kills[mode] += 1
        fleet.spawn(victim)
        await asyncio.sleep(rng.uniform(0.05, 1.0))
    dead = [victim, rng.choice(others)] if mode == "two_at_once" else [victim]
    for name in dead:
        fleet.kill(name)
    return dead


def _judge(
    report: CrashReport,
    fleet: Fleet,
    ledger: Ledger,
    requests: list[BenchRequest],
    stored: checks.Stored,
    recorder: ChannelRecorder,
    watch: ReaderWatch | None,
) -> None:
    problems = report.problems[:]
    reader = None if watch is None else (watch.rows, watch.samples, watch.reader.state.delivered())
    report.verdict = checks.judge(ledger, requests, stored, recorder.heard, reader)
    report.problems[:0] = problems
    report.problems.extend(
        checks.check_recovery(
            read_publish_logs(fleet.fault_dir),
            recorder.heard,
            {
                name: [(inc.pid, inc.started_wall) for inc in m.incarnations]
                for name, m in fleet.members.items()
            },
        )  # fmt: skip
    )
    fired: Counter[str] = Counter()
    for name in fleet.names:
        for line in fleet.log_text(name).splitlines():
            if line.startswith("FAULT-HOOK "):
                fired[line.split()[1]] += 1
            elif "Traceback" in line or " ERROR " in line:
                report.problems.append(f"{name} logged: {line[:300]}")
    report.hooks_fired = dict(fired)


def read_publish_logs(folder: Path) -> list[checks.Published]:
    out = []
    for path in sorted(folder.glob("publish.*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by SIGKILL
                out.append(checks.Published(**json.loads(line)))
    return out


async def _max_ordering(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        row = await (
            await conn.execute("SELECT coalesce(max(stream_ordering), 0) FROM events")
        ).fetchone()
    return int(row[0]) if row else 0


def _drop_database(server: PrivatePostgres, name: str) -> None:
    with contextlib.suppress(psycopg.OperationalError):
        with psycopg.connect(server.url(MAINTENANCE_DB), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.crash_loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--rooms", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--events", type=int, default=0, help="workload slots (default: --seconds x --rate)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s offered")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--commit-in-draw-order", action="store_true", help="the opt-in lane setting"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=Path("/tmp") / f"crash-loop-{int(time.time())}")
    args = parser.parse_args(argv)
    if reason := PrivatePostgres.unavailable_reason():
        print(f"crash loop: no private PostgreSQL: {reason}", file=sys.stderr)
        return 2
    settings = CrashSettings(
        seconds=args.seconds, folder=args.out, instances=args.instances, rooms=args.rooms,
        concurrency=args.concurrency, events=args.events or int(args.seconds * args.rate * 1.2),
        rate=args.rate, seed=args.seed,
        config={"persist": {"commit_in_draw_order": args.commit_in_draw_order}},
    )  # fmt: skip
    server = PrivatePostgres.create(CLUSTER_SETTINGS)
    try:
        report = asyncio.run(run_crash_loop(settings, server, args.redis_url))
    finally:
        server.drop()
    print(json.dumps(asdict(report), indent=2))
    return 0 if not report.problems else 1


# Commit timestamps date every commit for the promise check; 200 connections
# leave room for restarts' stragglers.
CLUSTER_SETTINGS = {"track_commit_timestamp": "on", "max_connections": "200"}

if __name__ == "__main__":
    sys.exit(main())
