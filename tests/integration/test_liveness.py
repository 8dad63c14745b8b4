"""Dead writers: fencing, takeover, and announcing on their behalf (persister.liveness)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection

from persister.liveness import (
    DEPUTY_NS,
    FENCE_NS,
    FencedOut,
    InstanceAlreadyRunning,
    Liveness,
    announce_for_dead_writers,
    dead_writers,
    fence_check_txn,
    hold_liveness,
    settle_lost_connection,
)
from persister.replication.messages import RData, position_command
from persister.replication.publisher import Publisher
from persister.replication.reader import StreamReader
from persister.storage.streams import (
    ensure_instance_ids,
    read_stream_position,
    recover_position,
    upsert_stream_position_txn,
)
from tests.integration.stream_writers import (
    Listener,
    SimWriter,
    connect,
    draw,
    eventually,
    insert_events,
)


@pytest.fixture
async def listener(redis_url: str, redis_channel: str) -> AsyncIterator[Listener]:
    listener = Listener(redis_url, redis_channel)
    await listener.start()
    yield listener
    await listener.close()


@pytest.fixture
async def peer(redis_url: str, redis_channel: str) -> AsyncIterator[Publisher]:
    publisher = Publisher(redis_url, redis_channel, "peer")
    await publisher.start()
    yield publisher
    await publisher.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[AsyncConnection[Any]]:
    async with await connect(database_url) as conn:
        yield conn


async def kill_backend(admin: AsyncConnection[Any], conn: AsyncConnection[Any]) -> None:
    """What PostgreSQL sees when a client process dies: its session ends."""
    await admin.execute("SELECT pg_terminate_backend(%s, 5000)", (conn.info.backend_pid,))


class Straggler:
    """A write transaction that passed the fence and drew an ordering, then hangs."""

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self.conn = conn
        self.ordering = 0

    @classmethod
    async def open(cls, database_url: str, instance: str, epoch: int) -> Straggler:
        straggler = cls(await connect(database_url))
        await straggler.conn.execute("BEGIN")
        async with straggler.conn.cursor() as cur:
            await fence_check_txn(cur, instance, epoch)
        (straggler.ordering,) = await draw(straggler.conn, 1)
        await insert_events(straggler.conn, instance, [straggler.ordering])
        return straggler

    async def commit(self) -> None:
        await self.conn.execute("COMMIT")

    async def close(self) -> None:
        await self.conn.close()


# -- taking over an instance ------------------------------------------------------


async def test_a_second_process_for_the_same_instance_is_refused(database_url: str) -> None:
    first = Liveness(database_url, "w1")
    await first.acquire()
    second = Liveness(database_url, "w1")
    with pytest.raises(InstanceAlreadyRunning):
        await second.acquire(wait_s=0.3)
    await first.close()


async def test_each_takeover_raises_the_epoch(database_url: str) -> None:
    epochs = []
    for _ in range(3):
        liveness = Liveness(database_url, "w1")
        epochs.append(await liveness.acquire())
        await liveness.close()
    assert epochs == [1, 2, 3]


async def test_a_transaction_of_a_replaced_process_cannot_commit(
    database_url: str, conn: AsyncConnection[Any]
) -> None:
    old = Liveness(database_url, "w1")
    old_epoch = await old.acquire()
    await old.close()  # it lost its lock (or died); a new process starts
    new = Liveness(database_url, "w1")
    await new.acquire()
    with pytest.raises(FencedOut):
        async with conn.transaction(), conn.cursor() as cur:
            await fence_check_txn(cur, "w1", old_epoch)
    await new.close()


async def test_a_transaction_waiting_at_the_fence_during_a_takeover_is_fenced_out(
    database_url: str, conn: AsyncConnection[Any]
) -> None:
    liveness = Liveness(database_url, "w1")
    epoch = await liveness.acquire()
    ids = await ensure_instance_ids(conn, ["w1"])
    async with await connect(database_url) as successor:
        # A successor in the middle of taking over: fence held, epoch raised.
        await successor.execute("BEGIN")
        await successor.execute("SELECT pg_advisory_xact_lock(%s, %s)", (FENCE_NS, ids["w1"]))
        await successor.execute("UPDATE stream_writer_ids SET epoch = epoch + 1")
        await conn.execute("BEGIN")
        waiting = asyncio.create_task(fence_check_txn(conn.cursor(), "w1", epoch))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await successor.execute("COMMIT")
        with pytest.raises(FencedOut):
            await waiting
        await conn.execute("ROLLBACK")
    await liveness.close()


async def test_a_straggler_of_the_previous_process_is_ended_by_the_next_one(
    database_url: str, conn: AsyncConnection[Any]
) -> None:
    old = Liveness(database_url, "w1")
    straggler = await Straggler.open(database_url, "w1", await old.acquire())
    await old.close()
    new = Liveness(database_url, "w1")
    await new.acquire(wait_s=3.0)
    with pytest.raises(psycopg.OperationalError):
        await straggler.commit()
    cur = await conn.execute("SELECT count(*) FROM events")
    assert await cur.fetchone() == (0,)
    assert await recover_position(conn, "w1") == straggler.ordering
    await new.close()
    await straggler.close()


async def test_a_dropped_liveness_connection_is_taken_again_with_the_same_epoch(
    database_url: str, conn: AsyncConnection[Any]
) -> None:
    liveness = Liveness(database_url, "w1")
    epoch = await liveness.acquire()
    assert liveness._conn is not None
    await kill_backend(conn, liveness._conn)
    assert await dead_writers(conn, ["w1"]) == ["w1"]
    await liveness.check()
    assert liveness.epoch == epoch
    assert await dead_writers(conn, ["w1"]) == []
    async with conn.transaction(), conn.cursor() as cur:
        await fence_check_txn(cur, "w1", epoch)  # its writes go on
    await liveness.close()


async def test_a_process_whose_instance_was_taken_over_learns_it_is_fenced_out(
    database_url: str, conn: AsyncConnection[Any]
) -> None:
    old = Liveness(database_url, "w1")
    await old.acquire()
    assert old._conn is not None
    await kill_backend(conn, old._conn)
    new = Liveness(database_url, "w1")
    await new.acquire()
    with pytest.raises(FencedOut):
        await old.check(wait_s=0.3)
    await new.close()
    await old.close()


async def test_settling_a_lost_connection_waits_until_its_backend_is_gone(
    database_url: str, conn: AsyncConnection[Any]
) -> None:
    lost = await connect(database_url)
    pid = lost.info.backend_pid
    await lost.execute("BEGIN")
    await settle_lost_connection(conn, pid)
    cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
    assert await cur.fetchone() == (0,)
    await lost.close()


# -- announcing for dead writers -------------------------------------------------------


async def test_a_live_writer_is_not_announced_for(
    database_url: str, conn: AsyncConnection[Any], peer: Publisher
) -> None:
    liveness = Liveness(database_url, "w1")
    await liveness.acquire()
    assert await announce_for_dead_writers(conn, peer, ["w1", "peer"], self_instance="peer") == []
    await liveness.close()


async def test_a_dead_writer_is_announced_in_its_own_name_at_the_sequence(
    conn: AsyncConnection[Any], peer: Publisher, listener: Listener
) -> None:
    await draw(conn, 4)
    assert await announce_for_dead_writers(conn, peer, ["w1", "peer"], self_instance="peer") == [
        "w1"
    ]
    await draw(conn, 2)
    await announce_for_dead_writers(conn, peer, ["w1", "peer"], self_instance="peer")
    assert await peer.flush(5.0)
    await eventually(lambda: len(listener.of("w1")) == 2)
    # It never wrote its row, so it never drew: the first announcement makes
    # no claim about earlier rows; the second continues the chain.
    assert listener.of("w1") == [position_command("w1", 4, 4), position_command("w1", 4, 6)]
    assert await read_stream_position(conn, "w1") == 6
    assert listener.of("peer") == []


async def test_the_announcement_carries_the_dead_writers_rows_above_its_stored_position(
    conn: AsyncConnection[Any], peer: Publisher, listener: Listener
) -> None:
    await draw(conn, 5)
    async with conn.transaction(), conn.cursor() as cur:
        await upsert_stream_position_txn(cur, "events", "w1", 1)
    await insert_events(conn, "w1", [2, 3])  # committed above an open batch, then it died
    await insert_events(conn, "other", [4])
    await announce_for_dead_writers(conn, peer, ["w1"])
    assert await peer.flush(5.0)
    await eventually(lambda: len(listener.of("w1")) == 1)
    (command,) = listener.of("w1")
    assert isinstance(command, RData)
    assert (command.prev, command.pos) == (1, 5)
    assert [r.stream_ordering for r in command.rows] == [2, 3]


async def test_a_dead_writers_straggler_cannot_commit_after_a_peer_announced_past_it(
    database_url: str, conn: AsyncConnection[Any], peer: Publisher, listener: Listener
) -> None:
    liveness = Liveness(database_url, "w1")
    straggler = await Straggler.open(database_url, "w1", await liveness.acquire())
    await liveness.close()  # the process is gone; its transaction's backend is not
    assert await announce_for_dead_writers(conn, peer, ["w1"]) == ["w1"]
    with pytest.raises(psycopg.OperationalError):
        await straggler.commit()
    assert await peer.flush(5.0)
    await eventually(lambda: bool(listener.of("w1")))
    assert listener.of("w1")[-1].pos >= straggler.ordering
    cur = await conn.execute("SELECT count(*) FROM events")
    assert await cur.fetchone() == (0,)
    await straggler.close()


async def test_a_writer_reaching_its_fence_after_an_announcement_draws_higher_orderings(
    database_url: str, conn: AsyncConnection[Any], peer: Publisher, listener: Listener
) -> None:
    liveness = Liveness(database_url, "w1")
    epoch = await liveness.acquire()
    assert liveness._conn is not None
    await kill_backend(conn, liveness._conn)  # only its lock connection dropped
    await draw(conn, 3)
    await announce_for_dead_writers(conn, peer, ["w1"])
    assert await peer.flush(5.0)
    await eventually(lambda: bool(listener.of("w1")))
    announced = listener.of("w1")[-1].pos
    async with await connect(database_url) as writer_conn:
        async with writer_conn.transaction(), writer_conn.cursor() as cur:
            await fence_check_txn(cur, "w1", epoch)  # not replaced: still allowed
            (ordering,) = await draw(writer_conn, 1)
    assert ordering > announced
    await liveness.close()


async def test_only_one_peer_announces_for_a_dead_writer_at_a_time(
    database_url: str, conn: AsyncConnection[Any], peer: Publisher
) -> None:
    ids = await ensure_instance_ids(conn, ["w1"])
    async with await connect(database_url) as other_peer:
        await other_peer.execute("BEGIN")
        await other_peer.execute("SELECT pg_advisory_xact_lock(%s, %s)", (DEPUTY_NS, ids["w1"]))
        assert await announce_for_dead_writers(conn, peer, ["w1"]) == []
        await other_peer.execute("COMMIT")
    assert await announce_for_dead_writers(conn, peer, ["w1"]) == ["w1"]


# -- the contract: a SIGKILLed writer stalls readers for at most 2 s ---------------------

DOOMED_WRITER = """
import asyncio, sys
from persister.liveness import Liveness, fence_check_txn
from persister.positions import WriterPositions
from persister.replication.publisher import Publisher
from persister.storage.streams import heartbeat_position, recover_position
from psycopg import AsyncConnection

async def main(db, redis, channel):
    liveness = Liveness(db, "w2")
    await liveness.acquire()
    conn = await AsyncConnection.connect(db, autocommit=True)
    positions = WriterPositions("w2", await recover_position(conn, "w2"))
    publisher = Publisher(redis, channel, "w2")
    await publisher.start()
    await publisher.publish_position(positions.position())
    beat = await AsyncConnection.connect(db, autocommit=True)
    publisher.start_heartbeat(lambda: heartbeat_position(beat, positions, "w2"), 0.2)
    await conn.execute("BEGIN")
    await fence_check_txn(conn.cursor(), "w2", liveness.epoch)
    token = positions.begin_fetch()
    cur = await conn.execute("SELECT nextval('events_stream_seq')")
    (ordering,) = await cur.fetchone()
    positions.end_fetch(token, [ordering])
    print("ready", ordering, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.slow
async def test_a_sigkilled_writer_stalls_readers_for_at_most_two_seconds(
    database_url: str, redis_url: str, redis_channel: str
) -> None:
    publisher = Publisher(redis_url, redis_channel, "w1")
    await publisher.start()
    liveness = Liveness(database_url, "w1")
    w1 = SimWriter(database_url, "w1", publisher, epoch=await liveness.acquire())
    await w1.start()
    reader = StreamReader(redis_url, redis_channel, database_url, ["w1", "w2"])
    await reader.start()
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DOOMED_WRITER,
        database_url,
        redis_url,
        redis_channel,
        stdout=asyncio.subprocess.PIPE,
    )
    announcer = asyncio.create_task(_announce_every(database_url, publisher, 0.5))
    try:
        assert doomed.stdout is not None
        line = await asyncio.wait_for(doomed.stdout.readline(), 15.0)
        straggler = int(line.split()[1])
        rows = await w1.write(2)
        await asyncio.sleep(0.5)
        assert reader.complete_up_to() < straggler  # w2's open transaction holds it back

        os.kill(doomed.pid, signal.SIGKILL)
        killed = time.monotonic()
        rows = await w1.write(1)
        assert await reader.wait_for(rows[-1].stream_ordering, timeout=2.0)
        assert time.monotonic() - killed <= 2.0
        async with await connect(database_url) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM events WHERE stream_ordering = %s", (straggler,)
            )
            assert await cur.fetchone() == (0,)
    finally:
        announcer.cancel()
        if doomed.returncode is None:
            doomed.kill()
        await doomed.wait()
        await reader.close()
        await publisher.close()
        await w1.close()
        await liveness.close()


async def _announce_every(database_url: str, publisher: Publisher, interval_s: float) -> None:
    async with await connect(database_url) as conn:
        while True:
            await announce_for_dead_writers(conn, publisher, ["w1", "w2"], self_instance="w1")
            await asyncio.sleep(interval_s)


async def test_the_liveness_lock_outlives_transactions_on_a_non_autocommit_connection(
    database_url: str, conn: AsyncConnection[Any]
) -> None:
    async with await AsyncConnection.connect(database_url) as plain:
        assert await hold_liveness(plain, "w1") == 1
        await plain.commit()
        assert await dead_writers(conn, ["w1"]) == []
    # The lock goes when the server's backend exits, a moment after the client
    # hangs up (a busy machine made the moment long enough to see: CI, tenth session).
    deadline = time.monotonic() + 5.0
    while await dead_writers(conn, ["w1"]) != ["w1"]:
        assert time.monotonic() < deadline, "the closed connection still holds the lock"
        await asyncio.sleep(0.02)
