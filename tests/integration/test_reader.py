"""The reader library against real PostgreSQL and Redis.

Writers are simulated (`SimWriter`) or their messages written by hand, so each
test can lose, reorder or repeat exactly the messages it wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from persister.replication.messages import Command, encode_command, position_command, rdata_command
from persister.replication.publisher import Publisher
from persister.replication.reader import StreamReader, parse_token
from persister.storage.streams import ensure_instance_ids, upsert_stream_position_txn
from tests.integration.stream_writers import (
    RedisProxy,
    SimWriter,
    collect,
    connect,
    draw,
    eventually,
    insert_events,
)

ReaderFactory = Callable[..., Awaitable[StreamReader]]


@pytest.fixture
async def make_reader(
    redis_url: str, redis_channel: str, database_url: str
) -> AsyncIterator[ReaderFactory]:
    readers: list[StreamReader] = []

    async def make(writers: list[str], **options: object) -> StreamReader:
        url = options.pop("redis_url", redis_url)
        reader = StreamReader(url, redis_channel, database_url, writers, **options)  # type: ignore[arg-type]
        await reader.start()
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        await reader.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def writers(
    database_url: str, redis_url: str, redis_channel: str
) -> AsyncIterator[Callable[[str], Awaitable[SimWriter]]]:
    started: list[tuple[SimWriter, Publisher]] = []

    async def make(name: str) -> SimWriter:
        publisher = Publisher(redis_url, redis_channel, name)
        await publisher.start()
        writer = SimWriter(database_url, name, publisher)
        await writer.start()
        started.append((writer, publisher))
        return writer

    yield make
    for writer, publisher in started:
        await publisher.close()
        await writer.close()


class Hand:
    """Messages written by hand, for losing and reordering them at will."""

    def __init__(self, redis: Redis, channel: str) -> None:
        self.redis, self.channel = redis, channel

    async def send(self, *commands: Command) -> None:
        for command in commands:
            await self.redis.publish(self.channel, encode_command(command))


@pytest.fixture
def hand(redis: Redis, redis_channel: str) -> Hand:
    return Hand(redis, redis_channel)


async def kill_clients_named(redis: Redis, name: str) -> int:
    ids = [c["id"] for c in await redis.client_list() if c.get("name") == name]
    for client_id in ids:
        await redis.client_kill_filter(_id=client_id)
    return len(ids)


def orderings(rows: list) -> list[int]:  # type: ignore[type-arg]
    return [row.stream_ordering for row in rows]


# -- the normal flow ----------------------------------------------------------


async def test_rows_of_several_writers_arrive_once_in_stream_order(
    make_reader: ReaderFactory, writers: Callable[[str], Awaitable[SimWriter]]
) -> None:
    w1, w2 = await writers("w1"), await writers("w2")
    reader = await make_reader(["w1", "w2"])
    for _ in range(5):
        await w1.write(2)
        await w2.write(1)
    await w1.heartbeat()  # w1 last wrote 14; it must say it will not write 15
    rows = await collect(reader, 15)
    assert orderings(rows) == list(range(1, 16))
    assert reader.complete_up_to() == 15


async def test_while_messages_follow_each_other_rows_come_from_redis_alone(
    make_reader: ReaderFactory, writers: Callable[[str], Awaitable[SimWriter]]
) -> None:
    w1 = await writers("w1")
    assert w1.publisher is not None and await w1.publisher.flush(5.0)
    reader = await make_reader(["w1"])
    for _ in range(3):
        await w1.write(2)
    assert orderings(await collect(reader, 6)) == [1, 2, 3, 4, 5, 6]
    assert reader.database_reads == 0


async def test_an_idle_writers_heartbeat_lets_the_busy_writers_rows_through(
    make_reader: ReaderFactory, writers: Callable[[str], Awaitable[SimWriter]]
) -> None:
    busy, idle = await writers("busy"), await writers("idle")
    reader = await make_reader(["busy", "idle"])
    await busy.write(3)
    assert not await reader.wait_for(3, timeout=0.3)  # idle still says 0
    await idle.heartbeat()
    assert await reader.wait_for(3, timeout=5.0)
    assert orderings(await collect(reader, 3)) == [1, 2, 3]


async def test_a_row_committed_above_an_open_transaction_waits_for_it(
    database_url: str, make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1"])
    async with await connect(database_url) as conn:
        two = await insert_events(conn, "w1", [2])  # 1 is still open in another lane
        await hand.send(position_command("w1", 0, 0))  # so w1's position stays 0
        assert not await reader.wait_for(2, timeout=0.2)
        one = await insert_events(conn, "w1", [1])
    await hand.send(rdata_command("w1", 0, 2, (*one, *two)))
    assert orderings(await collect(reader, 2)) == [1, 2]


# -- missed, reordered and repeated messages ---------------------------------------


async def test_a_missed_message_is_caught_up_from_the_database(
    database_url: str, make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1"])
    async with await connect(database_url) as conn:
        one, _two, three = [await insert_events(conn, "w1", [o]) for o in (1, 2, 3)]
    await hand.send(rdata_command("w1", 0, 1, tuple(one)))
    # rdata_command("w1", 1, 2, _two) is lost
    await hand.send(rdata_command("w1", 2, 3, tuple(three)))
    assert orderings(await collect(reader, 3)) == [1, 2, 3]
    assert reader.database_reads >= 1


async def test_reordered_and_repeated_messages_neither_skip_nor_repeat_rows(
    database_url: str, make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1"])
    async with await connect(database_url) as conn:
        rows = await insert_events(conn, "w1", [1, 2, 3, 4])
    first = rdata_command("w1", 0, 2, tuple(rows[:2]))
    second = rdata_command("w1", 2, 4, tuple(rows[2:]))
    await hand.send(second, first, second, first)
    assert orderings(await collect(reader, 4)) == [1, 2, 3, 4]
    await hand.send(position_command("w1", 4, 4))
    assert await collect(reader, 0) == []
    assert reader.complete_up_to() == 4


async def test_a_position_whose_prev_does_not_match_triggers_catch_up(
    database_url: str, make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1"])
    async with await connect(database_url) as conn:
        await insert_events(conn, "w1", [1, 2])
    await hand.send(position_command("w1", 2, 5))  # claims nothing in (2, 5]; (0, 2] unseen
    assert orderings(await collect(reader, 2)) == [1, 2]
    assert reader.complete_up_to() == 5


async def test_unknown_and_malformed_messages_do_not_stop_the_reader(
    database_url: str, make_reader: ReaderFactory, redis: Redis, redis_channel: str, hand: Hand
) -> None:
    reader = await make_reader(["w1"])
    await redis.publish(redis_channel, b'{"cmd":"SHARDMAP","epoch":3,"writers":["w1"]}')
    await redis.publish(redis_channel, b"garbage")
    async with await connect(database_url) as conn:
        rows = await insert_events(conn, "w1", [1])
    await hand.send(rdata_command("w1", 0, 1, tuple(rows)))
    assert orderings(await collect(reader, 1)) == [1]


# -- Redis connections going away ------------------------------------------------


async def test_a_killed_subscription_reconnects_and_catches_up_from_stored_positions(
    database_url: str,
    make_reader: ReaderFactory,
    redis: Redis,
    redis_channel: str,
    hand: Hand,
) -> None:
    reader = await make_reader(["w1"])
    assert await kill_clients_named(redis, f"persister-reader.{redis_channel}") == 1
    async with await connect(database_url) as conn:
        rows = await insert_events(conn, "w1", [1, 2])
        async with conn.transaction(), conn.cursor() as cur:
            await upsert_stream_position_txn(cur, "events", "w1", 2)
    # Published while the reader was away: lost.
    await hand.send(rdata_command("w1", 0, 2, tuple(rows)))
    await eventually(lambda: reader.subscriptions >= 2)
    assert await reader.wait_for(2, timeout=5.0)  # from stream_positions, no message needed
    assert orderings(await collect(reader, 2)) == [1, 2]


async def test_messages_lost_while_redis_is_down_are_read_from_the_database(
    redis_url: str,
    make_reader: ReaderFactory,
    writers: Callable[[str], Awaitable[SimWriter]],
) -> None:
    parts = urllib.parse.urlsplit(redis_url)
    proxy = RedisProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.up()
    try:
        w1 = await writers("w1")
        reader = await make_reader(["w1"], redis_url=proxy.url)
        await w1.write(2)
        assert orderings(await collect(reader, 2)) == [1, 2]
        await proxy.down()  # the reader's Redis "restarts"
        await w1.write(3)
        await asyncio.sleep(0.2)
        await proxy.up()
        await eventually(lambda: reader.subscriptions >= 2)
        await w1.write(1)  # its prev shows the reader what it missed
        assert orderings(await collect(reader, 4)) == [3, 4, 5, 6]
    finally:
        await proxy.down()


async def test_start_fails_clearly_when_redis_cannot_be_reached(
    database_url: str, redis_channel: str
) -> None:
    reader = StreamReader(
        "redis://127.0.0.1:1/0", redis_channel, database_url, ["w1"], subscribe_timeout_s=0.3
    )
    with pytest.raises(ConnectionError, match="cannot subscribe"):
        await reader.start()


# -- where a reader starts, and consumers ---------------------------------------------


async def test_a_reader_starting_later_begins_where_the_stream_is_complete(
    make_reader: ReaderFactory, writers: Callable[[str], Awaitable[SimWriter]]
) -> None:
    w1 = await writers("w1")
    await w1.write(3)
    reader = await make_reader(["w1"])
    assert reader.complete_up_to() == 3
    await w1.write(1)
    assert orderings(await collect(reader, 1)) == [4]


async def test_from_position_replays_history_from_the_database(
    make_reader: ReaderFactory, writers: Callable[[str], Awaitable[SimWriter]]
) -> None:
    w1 = await writers("w1")
    await w1.write(3)
    reader = await make_reader(["w1"], from_position=1)
    await w1.heartbeat()
    assert orderings(await collect(reader, 2)) == [2, 3]


async def test_a_consumer_that_stops_early_resumes_after_the_last_row_it_got(
    make_reader: ReaderFactory, writers: Callable[[str], Awaitable[SimWriter]]
) -> None:
    w1 = await writers("w1")
    reader = await make_reader(["w1"])
    await w1.write(5)
    assert orderings(await collect(reader, 2)) == [1, 2]
    assert orderings(await collect(reader, 3)) == [3, 4, 5]


async def test_only_one_consumer_may_iterate_rows_at_a_time(make_reader: ReaderFactory) -> None:
    reader = await make_reader(["w1"])
    first = reader.rows()
    pending = asyncio.ensure_future(first.__anext__())
    await asyncio.sleep(0.05)
    with pytest.raises(RuntimeError, match="already being iterated"):
        await reader.rows().__anext__()
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    await first.aclose()


async def test_rows_ends_when_the_reader_closes(make_reader: ReaderFactory) -> None:
    reader = await make_reader(["w1"])

    async def consume() -> list:  # type: ignore[type-arg]
        return [row async for row in reader.rows()]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    await reader.close()
    assert await asyncio.wait_for(task, 2.0) == []


async def test_close_ends_even_when_redis_py_swallows_the_cancellation(
    make_reader: ReaderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cancellation that lands as redis-py's own read timeout expires can
    # come back as "no message": the listener must still stop.
    from redis.asyncio.client import PubSub

    real_get_message = PubSub.get_message

    async def swallowing_get_message(self: PubSub, *args: object, **kwargs: object) -> object:
        try:
            return await real_get_message(self, *args, **kwargs)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return None

    monkeypatch.setattr(PubSub, "get_message", swallowing_get_message)
    reader = await make_reader(["w1"])
    await asyncio.sleep(0.05)
    await asyncio.wait_for(reader.close(), 3.0)


async def test_wait_for_answers_false_on_timeout_and_true_once_complete(
    make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1"])
    assert not await reader.wait_for(3, timeout=0.1)
    waiting = asyncio.create_task(reader.wait_for(3, timeout=5.0))
    await hand.send(position_command("w1", 0, 3))
    assert await waiting


# -- the pool, and tokens ---------------------------------------------------------


async def test_the_token_names_writers_ahead_of_the_minimum_by_their_stored_ids(
    database_url: str, make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1", "w2", "w3"])
    async with await connect(database_url) as conn:
        ids = await ensure_instance_ids(conn, ["w1", "w2", "w3"])
        await draw(conn, 9)
    await hand.send(
        position_command("w1", 0, 5), position_command("w2", 0, 9), position_command("w3", 0, 7)
    )
    await eventually(lambda: reader.complete_up_to() == 5)
    assert ids == {"w1": 1, "w2": 2, "w3": 3}
    assert reader.token() == "m5~2.9~3.7"
    assert parse_token(reader.token()) == (5, {2: 9, 3: 7})
    await hand.send(position_command("w1", 5, 9), position_command("w3", 7, 9))
    await eventually(lambda: reader.complete_up_to() == 9)
    assert reader.token() == "s9"


async def test_adding_a_writer_never_moves_the_minimum_back(
    make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1"])
    await hand.send(position_command("w1", 0, 8))
    await eventually(lambda: reader.complete_up_to() == 8)
    await reader.set_writers(["w1", "w2"])
    assert reader.complete_up_to() == 8
    assert reader.positions() == {"w1": 8, "w2": 8}
    await hand.send(position_command("w1", 8, 12))
    await asyncio.sleep(0.1)
    assert reader.complete_up_to() == 8  # now w2 counts
    await hand.send(position_command("w2", 8, 12))
    assert await reader.wait_for(12, timeout=5.0)


async def test_removing_a_stalled_writer_lets_the_minimum_advance(
    make_reader: ReaderFactory, hand: Hand
) -> None:
    reader = await make_reader(["w1", "w2"])
    await hand.send(position_command("w1", 0, 8))
    await asyncio.sleep(0.1)
    assert reader.complete_up_to() == 0
    await reader.set_writers(["w1"])
    assert reader.complete_up_to() == 8
