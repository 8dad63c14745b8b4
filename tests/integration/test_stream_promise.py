"""The promise behind POSITION (contract section 6), checked on a real pool.

Three `persister run` processes take concurrent load through
`persister.client`; in the middle of it their Redis (a private one) is
restarted. Meanwhile every position announced on the channel, and every
change of two readers' complete_up_to, is noted with the number of events
it covers that are committed at that moment. Afterwards the events are
counted again: if a count grew, an event at or below an announced (or
reader-complete) position committed after the announcement, which the
promise forbids. One reader catches up from the database, the other over
the catch-up API; each must have delivered every committed forward event
exactly once, in stream order, Redis restart or not.

The run happens once (module fixture); each test states one property of it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg import AsyncConnection

from persister.bench.pool import BenchPool
from persister.devservices import Services
from tests.integration.live_pool import (
    ALL_WRITERS,
    Ack,
    Announcements,
    PrivateRedis,
    Promise,
    PromiseLog,
    ReaderRun,
    Recount,
    RoomLoad,
    base_urls,
    client_for,
    database_url,
    reader_for,
    rooms_owned_by,
    running_pool,
)

INSTANCES = 3
ROOMS_PER_WRITER = 8
LOAD_S = 8.0
REDIS_DOWN_AT_S = 3.0
REDIS_DOWN_FOR_S = 1.0
SETTLE_S = 15.0


@dataclass
class Run:
    writers: list[str]
    acks: list[Ack]
    failed_rooms: dict[str, str]
    announced: list[Promise]
    completed: list[Promise]
    recount: Recount
    readers: dict[str, ReaderRun]
    caught_up: dict[str, bool]
    exit_codes: dict[str, int | None]


async def scenario(services: Services, folder: Path) -> Run:
    redis = PrivateRedis()
    await redis.start()
    try:
        async with running_pool(services.database_url, redis.url, INSTANCES, folder) as pool:
            run = await _load_through_a_redis_restart(pool, redis)
        run.exit_codes.update(pool_exit_codes(pool))
        return run
    finally:
        await redis.stop()


def pool_exit_codes(pool: BenchPool) -> dict[str, int | None]:
    return {instance.name: instance.process.returncode for instance in pool.instances}


async def _load_through_a_redis_restart(pool: BenchPool, redis: PrivateRedis) -> Run:
    writers = list(pool.config.stream_writers.events)
    url = database_url(pool)
    async with (
        await AsyncConnection.connect(url, autocommit=True) as announce_conn,
        await AsyncConnection.connect(url, autocommit=True) as complete_conn,
    ):
        announced = PromiseLog(announce_conn)
        completed = PromiseLog(complete_conn)
        channel = Announcements(redis.url, pool.config.redis.channel, announced)
        await channel.start()
        readers = {
            "database": ReaderRun(reader_for(pool, redis.url), log=completed),
            "catch-up API": ReaderRun(
                reader_for(
                    pool,
                    redis.url,
                    catch_up_url=base_urls(pool),
                    catch_up_secret=pool.config.secret(),
                )
            ),
        }
        for reader in readers.values():
            await reader.begin()
        rooms = rooms_owned_by(writers, ROOMS_PER_WRITER)
        client = client_for(pool)
        load = RoomLoad(client, [room for owned in rooms.values() for room in owned])
        try:
            load.start()
            await asyncio.sleep(REDIS_DOWN_AT_S)
            await redis.stop()
            await asyncio.sleep(REDIS_DOWN_FOR_S)
            await redis.start()
            await asyncio.sleep(LOAD_S - REDIS_DOWN_AT_S - REDIS_DOWN_FOR_S)
            await load.stop()
            async with await AsyncConnection.connect(url, autocommit=True) as conn:
                settled = (await Recount.read(conn)).forward_orderings()
            caught_up = {
                name: await reader.caught_up_with(settled, SETTLE_S)
                for name, reader in readers.items()
            }
        finally:
            await client.close()
            await channel.stop()
            for reader in readers.values():
                await reader.end()
        recount = await Recount.read(announce_conn)
    return Run(
        writers,
        load.acks,
        load.failed_rooms,
        announced.promises,
        completed.promises,
        recount,
        readers,
        caught_up,
        {},
    )


@pytest.fixture(scope="module")
def run(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return asyncio.run(scenario(services, tmp_path_factory.mktemp("stream-promise")))


def describe(broken: list[tuple[Promise, int]]) -> str:
    return "; ".join(
        f"{p.who or 'the stream'} at {p.position}: {p.committed} committed when announced, "
        f"{now} now"
        for p, now in broken[:5]
    )


def test_all_three_persisters_took_load_across_the_redis_restart_and_stopped_cleanly(
    run: Run,
) -> None:
    per_writer = Counter(ack.instance for ack in run.acks)
    assert set(per_writer) == set(run.writers), per_writer
    assert min(per_writer.values()) >= 20, per_writer
    assert run.failed_rooms == {}
    assert run.exit_codes == dict.fromkeys(run.writers, 0)


def test_no_writer_commits_an_event_at_or_below_a_position_it_announced(run: Run) -> None:
    assert {p.who for p in run.announced} == set(run.writers)
    assert len(run.announced) >= 50  # a position for nearly every batch, not just heartbeats
    broken = run.recount.broken(run.announced)
    assert broken == [], describe(broken)


def test_a_readers_complete_position_never_runs_ahead_of_a_commit(run: Run) -> None:
    assert all(p.who == ALL_WRITERS for p in run.completed)
    assert len(run.completed) >= 20
    broken = run.recount.broken(run.completed)
    assert broken == [], describe(broken)


@pytest.mark.parametrize("reader", ["database", "catch-up API"])
def test_a_reader_delivers_every_committed_event_once_in_stream_order(
    run: Run, reader: str
) -> None:
    followed = run.readers[reader]
    assert run.caught_up[reader], (
        f"complete_up_to {followed.reader.complete_up_to()}, "
        f"{len(followed.delivered)} rows delivered"
    )
    committed = [o for o in run.recount.forward_orderings() if o > followed.start]
    assert len(committed) >= 500
    assert followed.delivered == committed


@pytest.mark.parametrize(
    ("reader", "reads"), [("database", "database_reads"), ("catch-up API", "catch_up_reads")]
)
def test_after_the_redis_restart_a_reader_resubscribed_and_read_what_it_missed(
    run: Run, reader: str, reads: str
) -> None:
    stream_reader = run.readers[reader].reader
    assert stream_reader.subscriptions >= 2
    assert getattr(stream_reader, reads) >= 1
