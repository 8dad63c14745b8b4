"""A persister SIGKILLed under load stalls readers for at most 2 s (issue 3).

Three real `persister run` processes take load through `persister.client`;
one of them is killed with SIGKILL while it has transactions in flight. The
survivors must notice (its liveness lock goes with its connection), fence
it, and announce past its unfinished orderings in its name, so that a
reader's complete_up_to moves on, without any of its late transactions
committing below what was announced for it.

The stall is what a reader sees: for every request the survivors answer
after the kill, the time from its answer until the reader's complete_up_to
covers it. The figure is printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from psycopg import AsyncConnection

from persister.bench.pool import BenchPool
from persister.devservices import Services
from tests.integration.live_pool import (
    Ack,
    Announcements,
    Promise,
    PromiseLog,
    ReaderRun,
    Recount,
    RoomLoad,
    client_for,
    database_url,
    reader_for,
    rooms_owned_by,
    running_pool,
)

STALL_LIMIT_S = 2.0
# While it stays dead, the peer announcing for it does so every 0.05 s, so
# the survivors' events wait about half that for readers (every 0.5 s it was
# ~220 ms at the median).
DEAD_MEDIAN_LAG_LIMIT_S = 0.1
ROOMS_PER_WRITER = 8
LOAD_BEFORE_KILL_S = 3.0
LOAD_AFTER_KILL_S = 4.0
VICTIM = 1  # index into the writer list
# Rooms of the victim give up after this (the client retries a dead owner).
CLIENT_DEADLINE_S = 2.0


@dataclass
class Run:
    victim: str
    killed_at: float
    acks: list[Ack]
    complete_at: list[tuple[float, int]]
    heard: list[tuple[float, str, int]]
    announced: list[Promise]
    recount: Recount
    reader: ReaderRun
    caught_up: bool
    failed_rooms: dict[str, str]
    victim_rooms: list[str] = field(default_factory=list)

    def seen_at(self, ordering: int) -> float:
        """When the reader's complete_up_to first covered `ordering` (inf: never)."""
        positions = [pos for _, pos in self.complete_at]
        index = bisect.bisect_left(positions, ordering)
        return self.complete_at[index][0] if index < len(positions) else float("inf")

    def first_relay_after_kill(self, grace_s: float = 0.1) -> float | None:
        """When a survivor first announced the victim past where it stood.

        Messages the victim published itself just before the kill may still
        arrive during `grace_s`; anything moving it further is a relay.
        """
        mine = [(t, pos) for t, who, pos in self.heard if who == self.victim]
        stood = max((pos for t, pos in mine if t <= self.killed_at + grace_s), default=0)
        return min((t for t, pos in mine if pos > stood), default=None)

    def lags_after(self, since: float) -> list[float]:
        """For each survivor's answer from `since` on, how long until the
        reader's complete_up_to covered it; sorted."""
        return sorted(
            max(0.0, self.seen_at(ack.highest) - ack.at)
            for ack in self.acks
            if ack.at >= since and ack.instance != self.victim
        )

    def lags_after_kill(self) -> list[float]:
        return self.lags_after(self.killed_at)


async def scenario(services: Services, folder: Path) -> Run:
    async with running_pool(services.database_url, services.redis_url, 3, folder) as pool:
        return await _kill_one_under_load(pool, services.redis_url)


async def _kill_one_under_load(pool: BenchPool, redis_url: str) -> Run:
    writers = list(pool.config.stream_writers.events)
    victim = writers[VICTIM]
    url = database_url(pool)
    async with (
        await AsyncConnection.connect(url, autocommit=True) as announce_conn,
        await AsyncConnection.connect(url, autocommit=True) as conn,
    ):
        announced = PromiseLog(announce_conn)
        channel = Announcements(redis_url, pool.config.redis.channel, announced)
        await channel.start()
        reader = ReaderRun(reader_for(pool, redis_url))
        await reader.begin()
        rooms = rooms_owned_by(writers, ROOMS_PER_WRITER)
        client = client_for(pool, deadline_s=CLIENT_DEADLINE_S)
        load = RoomLoad(client, [room for owned in rooms.values() for room in owned])
        try:
            load.start()
            await asyncio.sleep(LOAD_BEFORE_KILL_S)
            process = next(i.process for i in pool.instances if i.name == victim)
            process.kill()  # SIGKILL, our own child by its pid
            killed_at = time.monotonic()
            await asyncio.sleep(LOAD_AFTER_KILL_S)
            await load.stop()
            settled = (await Recount.read(conn)).forward_orderings()
            caught_up = await reader.caught_up_with(settled, 10.0)
        finally:
            await client.close()
            await channel.stop()
            await reader.end()
        recount = await Recount.read(conn)
    return Run(
        victim,
        killed_at,
        load.acks,
        reader.complete_at,
        channel.heard,
        announced.promises,
        recount,
        reader,
        caught_up,
        load.failed_rooms,
        rooms[victim],
    )


@pytest.fixture(scope="module")
def run(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return asyncio.run(scenario(services, tmp_path_factory.mktemp("dead-writer")))


@pytest.mark.slow
def test_a_sigkilled_persister_stalls_readers_for_at_most_two_seconds(run: Run) -> None:
    lags = run.lags_after_kill()
    assert len(lags) >= 50, "the survivors kept taking load"
    stall = lags[-1]
    relayed = run.first_relay_after_kill()
    relay_after = "never" if relayed is None else f"{relayed - run.killed_at:.3f} s"
    print(
        f"\ndead-writer stall: {stall:.3f} s (longest wait of {len(lags)} requests answered "
        f"after the SIGKILL; median {lags[len(lags) // 2] * 1000:.1f} ms); first announcement "
        f"in the dead writer's name {relay_after} after the kill"
    )
    assert stall <= STALL_LIMIT_S


@pytest.mark.slow
def test_while_it_stays_dead_readers_see_the_survivors_events_promptly(run: Run) -> None:
    relayed = run.first_relay_after_kill()
    assert relayed is not None, "nobody announced in the dead writer's name"
    lags = run.lags_after(relayed)
    assert len(lags) >= 50, "the survivors kept taking load"
    assert lags[len(lags) // 2] <= DEAD_MEDIAN_LAG_LIMIT_S, f"median {lags[len(lags) // 2]:.3f} s"


@pytest.mark.slow
def test_what_was_announced_for_the_dead_persister_held(run: Run) -> None:
    announced_for_victim = [
        p for p in run.announced if p.who == run.victim and p.at > run.killed_at
    ]
    assert announced_for_victim, "nobody announced in the dead writer's name"
    broken = run.recount.broken(run.announced)
    assert broken == [], broken[:5]


@pytest.mark.slow
def test_the_reader_still_gets_every_committed_event_once_in_order(run: Run) -> None:
    assert run.caught_up
    committed = [o for o in run.recount.forward_orderings() if o > run.reader.start]
    assert run.reader.delivered == committed


@pytest.mark.slow
def test_only_the_dead_persisters_rooms_failed(run: Run) -> None:
    assert set(run.failed_rooms) <= set(run.victim_rooms)
