"""Issue 7, item 2: PostgreSQL goes away under load.

A pool of two persisters on a private cluster, loaded through the client and
by a prober that records raw answers. The faults, in turn:

    terminate  pg_terminate_backend on every backend of the persisters'
               database (lanes, liveness locks, background jobs, the reader)
    restart    `pg_ctlcluster restart` (fast shutdown: open transactions die)
    stop       the cluster down for a while, then started again
    immediate  (long form) restart with `-m immediate`: crash recovery

What must hold: requests in flight when it happens are answered 503 with
Retry-After, within a bound, never a hang or a 500; /health answers 503
while the database is away and 200 once it is back; the persisters
reconnect by themselves (with backoff) and answer 200 again within
`RECOVERY_BOUND_S` of the database being back; every request is stored
all-or-nothing, nothing acknowledged is lost or doubled, the DAG is right
and no announced position ran ahead of a commit.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
import pytest

from persister.storage.migrate import migrate
from tests.faults.pgproxy import PgProxy
from tests.faults.scenario import Scenario
from tests.faults.servers import PrivatePostgres

RECOVERY_BOUND_S = 10.0
# /health may say 200 for this long after the database went away: an idle
# lane notices at its next connection check (every second).
HEALTH_NOTICE_S = 2.0
IDLE_NOTICE_S = 2.0

TERMINATE_ALL = """
    SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class Form:
    faults: tuple[str, ...]
    stop_s: float  # how long the "stop" fault keeps the cluster down
    seconds: float  # about how long it all takes


FORMS = [
    pytest.param(Form(("terminate", "restart", "stop"), stop_s=3.0, seconds=25), id="short"),
    pytest.param(
        Form(("terminate", "restart", "stop", "immediate") * 3, stop_s=10.0, seconds=200),
        id="long",
        marks=[pytest.mark.slow, pytest.mark.timeout(1200)],
    ),
]


@dataclass
class Outage:
    fault: str
    began: float
    back: float  # the database accepts connections again
    terminated: int = 0
    recovered_s: dict[str, float | None] = field(default_factory=dict)  # first 200 after `back`
    healthy_s: dict[str, float | None] = field(default_factory=dict)  # /health 200 after `back`
    # "stop" only: /health from HEALTH_NOTICE_S after the stop until the start
    health_while_away: dict[str, list[int | None]] = field(default_factory=dict)
    refused: int = 0  # probe answers 503 while it lasted


@pytest.mark.parametrize("form", FORMS)
async def test_persisters_answer_503_meanwhile_and_recover_when_postgres_returns(
    form: Form, private_postgres: PrivatePostgres, redis_url: str, tmp_path: Path
) -> None:
    database_url = private_postgres.url(f"persister_pgfault_{int(time.time() * 1000)}")
    await migrate(database_url)
    outages: list[Outage] = []

    async def faults(s: Scenario) -> None:
        await asyncio.sleep(2.0)  # under way first
        for fault in form.faults:
            outages.append(await _inflict(fault, s, private_postgres, database_url, form.stop_s))
            await asyncio.sleep(1.0)

    try:
        async with Scenario(tmp_path, database_url, redis_url, seconds_hint=form.seconds) as s:
            await s.run(faults)
            verdict = await s.finish()
            probe = s.prober.answers if s.prober else []
            timeouts = s.client.stats.timeouts if s.client else 0
            logs = {name: s.fleet.log_text(name) for name in s.fleet.names}
    finally:
        _drop(private_postgres, database_url)

    figures = {"outages": [asdict(o) for o in outages], "verdict": asdict(verdict),
               "probe_answers": len(probe), "client_timeouts": timeouts}  # fmt: skip
    print("\npostgres faults:", json.dumps(figures, indent=1, default=str))

    assert verdict.problems == []
    assert verdict.lost == 0 and verdict.duplicated == 0 and verdict.promise_violations == 0
    assert timeouts == 0, "no attempt of the client waited out its 10 s timeout"
    for outage in outages:
        for name, seconds in outage.recovered_s.items():
            assert seconds is not None and seconds < RECOVERY_BOUND_S, (outage.fault, name)
        for name, seconds in outage.healthy_s.items():
            assert seconds is not None and seconds < RECOVERY_BOUND_S, (outage.fault, name)
        if outage.fault == "stop":
            assert outage.refused > 0, "requests sent while it was down were answered 503"
            for name, statuses in outage.health_while_away.items():
                # (None: /health did not answer within its second, on a busy machine)
                assert 503 in statuses and set(statuses) <= {503, None}, (
                    name, statuses, _warnings(logs[name])
                )  # fmt: skip


async def _inflict(
    fault: str, s: Scenario, server: PrivatePostgres, database_url: str, stop_s: float
) -> Outage:
    began = time.time()
    terminated = 0
    health_while_away: dict[str, list[int | None]] = {}
    if fault == "terminate":
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            row = await (await conn.execute(TERMINATE_ALL)).fetchone()
            terminated = int(row[0]) if row else 0
    elif fault == "restart":
        await asyncio.to_thread(server.restart, "fast")
    elif fault == "immediate":
        await asyncio.to_thread(server.restart, "immediate")
    elif fault == "stop":
        await asyncio.to_thread(server.stop, "fast")
        down = time.time()
        await asyncio.sleep(stop_s)
        for name in s.fleet.names:
            health_while_away[name] = s.health.between(name, down + HEALTH_NOTICE_S, time.time())
        await asyncio.to_thread(server.start)
    await asyncio.to_thread(server.wait_ready)
    back = time.time()
    outage = Outage(fault, began, back, terminated, health_while_away=health_while_away)
    deadline = back + RECOVERY_BOUND_S + 5
    while time.time() < deadline and not _recovered(s, outage):
        await asyncio.sleep(0.1)
    _recovered(s, outage)
    assert s.prober is not None
    outage.refused = sum(1 for a in s.prober.answers if began <= a.sent < back and a.status == 503)
    return outage


def _warnings(log: str, last: int = 40) -> str:
    """The instance's last warnings: what it noticed of the outage, and when."""
    lines = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    return "\n".join(lines[-last:])


def _recovered(s: Scenario, outage: Outage) -> bool:
    assert s.prober is not None
    for name in s.fleet.names:
        # The first request sent after it was back and acknowledged (load or probe).
        ok = [a.sent + a.took for a in s.prober.answers
              if a.instance == name and a.status == 200 and a.sent >= outage.back]  # fmt: skip
        if (acked := s.ledger.first_answer_after(name, outage.back)) is not None:
            ok.append(acked)
        outage.recovered_s[name] = min(ok) - outage.back if ok else None
        healthy = s.health.first_ok_after(name, outage.back)
        outage.healthy_s[name] = None if healthy is None else healthy - outage.back
    return all(v is not None for v in [*outage.recovered_s.values(), *outage.healthy_s.values()])


def _drop(server: PrivatePostgres, database_url: str) -> None:
    from psycopg import sql

    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


LOST_COMMIT_LANDED = "a COMMIT whose answer was lost did land"


@pytest.mark.parametrize("commit_in_draw_order", [False, True], ids=["default", "in-draw-order"])
async def test_a_commit_whose_answer_was_lost_is_settled_before_the_position_passes_it(
    private_postgres: PrivatePostgres, redis_url: str, tmp_path: Path, commit_in_draw_order: bool
) -> None:
    """The lane's COMMIT reaches the server and lands, but the connection
    drops before the answer, and for 2 s the database cannot be reached to
    ask what became of it. The writer must wait: announce nothing past those
    orderings until it knows, then publish the rows that did land, so that
    readers following the announcements miss none of them."""
    name = f"persister_lostcommit_{int(time.time() * 1000)}"
    await migrate(private_postgres.url(name))
    proxy = PgProxy(private_postgres.port)
    await proxy.start()

    def fleet_logs(s: Scenario) -> str:
        return "".join(s.fleet.log_text(n) for n in s.fleet.names)

    async def lose_a_commit(s: Scenario) -> None:
        await asyncio.sleep(1.5)
        # The COMMIT the proxy picks seldom writes nothing (2 runs in ~30):
        # then there is nothing to publish, and the test would prove nothing
        # about publishing what landed, so another one is lost.
        for _ in range(3):
            proxy.arm_lost_commit(refuse_s=2.0)
            await asyncio.wait_for(proxy.fired.wait(), 10.0)
            await asyncio.sleep(4.0)
            if LOST_COMMIT_LANDED in fleet_logs(s):
                return

    try:
        async with Scenario(
            tmp_path, private_postgres.url(name), redis_url, seconds_hint=12,
            config={
                "database": {"url": proxy.url(name)},
                "persist": {"commit_in_draw_order": commit_in_draw_order},
            },
        ) as s:  # fmt: skip
            await s.run(lose_a_commit)
            verdict = await s.finish()
            logs = fleet_logs(s)
    finally:
        await proxy.close()
        _drop(private_postgres, private_postgres.url(name))

    print("\nlost commit:", json.dumps(asdict(verdict), indent=1))
    settling = [line for line in logs.splitlines() if "COMMIT" in line or "settle" in line]
    assert 1 <= proxy.lost_commits <= 3
    assert LOST_COMMIT_LANDED in logs, "\n".join(settling)
    assert verdict.problems == []
    assert verdict.lost == 0 and verdict.duplicated == 0 and verdict.promise_violations == 0


async def test_an_idle_persister_reports_503_while_postgres_is_down_and_200_after(
    private_postgres: PrivatePostgres, redis_url: str, tmp_path: Path
) -> None:
    """Nothing to write, so no batch finds the dead connections: /health must
    notice by itself, within IDLE_NOTICE_S, and recover once it is back."""
    name = f"persister_idle_{int(time.time() * 1000)}"
    await migrate(private_postgres.url(name))
    stopped = started = 0.0

    async def stop_while_idle(s: Scenario) -> None:
        nonlocal stopped, started
        await asyncio.sleep(1.0)
        await asyncio.to_thread(private_postgres.stop, "fast")
        stopped = time.time()
        await asyncio.sleep(IDLE_NOTICE_S + 1.0)
        started = time.time()
        await asyncio.to_thread(private_postgres.start)
        deadline = time.time() + RECOVERY_BOUND_S
        while time.time() < deadline and not all(
            s.health.first_ok_after(name, started) for name in s.fleet.names
        ):
            await asyncio.sleep(0.1)

    try:
        async with Scenario(
            tmp_path, private_postgres.url(name), redis_url, seconds_hint=1, rate=1.0
        ) as s:
            await stop_while_idle(s)  # no load at all
            for instance in s.fleet.names:
                assert 503 in s.health.between(instance, stopped, started), instance
                statuses = set(s.health.between(instance, stopped + IDLE_NOTICE_S, started))
                assert statuses <= {503, None}, (instance, statuses)
                back = s.health.first_ok_after(instance, started)
                assert back is not None and back - started < RECOVERY_BOUND_S
            await s.fleet.stop_all()
    finally:
        _drop(private_postgres, private_postgres.url(name))
