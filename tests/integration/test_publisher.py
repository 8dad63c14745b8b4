"""The publisher against a real Redis: order, heartbeats, and Redis going away."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from persister.replication.messages import Command, RData, position_command
from persister.replication.publisher import Publisher
from tests.integration.stream_writers import Listener, RedisProxy, event_row, eventually


@pytest.fixture
async def listener(redis_url: str, redis_channel: str) -> AsyncIterator[Listener]:
    listener = Listener(redis_url, redis_channel)
    await listener.start()
    yield listener
    await listener.close()


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[RedisProxy]:
    parts = urllib.parse.urlsplit(redis_url)
    proxy = RedisProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.up()
    yield proxy
    await proxy.down()


def assert_chain(commands: list[Command]) -> None:
    """Each message continues the previous one and positions never decrease."""
    for before, after in zip(commands, commands[1:], strict=False):
        assert after.prev == before.pos
        assert after.pos >= before.pos


async def test_batches_arrive_in_order_as_one_unbroken_chain(
    redis_url: str, redis_channel: str, listener: Listener
) -> None:
    publisher = Publisher(redis_url, redis_channel, "w1")
    await publisher.start()
    await publisher.publish_position(0)
    for ordering in range(1, 31):
        await publisher.publish_batch([event_row(ordering, "w1")], ordering)
    assert await publisher.flush(5.0)
    await eventually(lambda: listener.of("w1") and listener.of("w1")[-1].pos == 30)
    commands = listener.of("w1")
    assert_chain(commands)
    rows = [r.stream_ordering for c in commands if isinstance(c, RData) for r in c.rows]
    assert rows == list(range(1, 31))
    await publisher.close()


async def test_an_idle_writer_announces_at_least_once_a_second(
    redis_url: str, redis_channel: str, listener: Listener
) -> None:
    publisher = Publisher(redis_url, redis_channel, "w1")
    await publisher.start()

    async def position() -> int:
        await asyncio.sleep(0.1)  # a slow database read
        return 42

    publisher.start_heartbeat(position)
    await asyncio.sleep(3.2)
    await publisher.close()
    times = [t for t, c in listener.commands if c.instance == "w1"]
    assert len(times) >= 4
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) < 1.0
    assert all(c.pos == 42 for c in listener.of("w1"))


async def test_the_heartbeat_repeats_the_last_position_when_its_source_fails(
    redis_url: str, redis_channel: str, listener: Listener
) -> None:
    publisher = Publisher(redis_url, redis_channel, "w1")
    await publisher.start()
    await publisher.publish_position(7)

    async def broken() -> int:
        raise OSError("database down")

    publisher.start_heartbeat(broken, interval_s=0.1)
    await asyncio.sleep(0.6)
    await publisher.close()
    assert len(listener.of("w1")) >= 4
    assert {c.pos for c in listener.of("w1")} == {7}


async def test_publishing_never_raises_or_blocks_while_redis_is_unreachable(
    redis_channel: str,
) -> None:
    publisher = Publisher("redis://127.0.0.1:1/0", redis_channel, "w1")
    await publisher.start()
    started = time.monotonic()
    for ordering in range(1, 1001):
        await publisher.publish_batch([event_row(ordering, "w1")], ordering)
    await publisher.publish_position(1000)
    assert time.monotonic() - started < 0.5
    assert not await publisher.flush(0.2)
    await publisher.close(flush_timeout_s=0.1)


async def test_when_redis_returns_the_current_position_is_published_continuing_the_chain(
    redis_channel: str, listener: Listener, proxy: RedisProxy
) -> None:
    publisher = Publisher(proxy.url, redis_channel, "w1")
    await publisher.start()
    await publisher.publish_position(0)
    assert await publisher.flush(5.0)
    await proxy.down()
    for ordering in range(1, 6):  # persisting goes on while Redis is away
        await publisher.publish_batch([event_row(ordering, "w1")], ordering)
    await asyncio.sleep(0.3)
    assert publisher.announced() == 0
    await proxy.up()
    assert await publisher.flush(5.0)
    await eventually(lambda: listener.of("w1")[-1].pos == 5)
    commands = listener.of("w1")
    assert_chain(commands)
    assert [r.stream_ordering for r in commands[-1].rows] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
    await publisher.close()


async def test_a_killed_publisher_connection_is_replaced_transparently(
    redis_url: str, redis_channel: str, listener: Listener
) -> None:
    publisher = Publisher(redis_url, redis_channel, "w-kill")
    await publisher.start()
    await publisher.publish_position(1)
    assert await publisher.flush(5.0)
    async with Redis.from_url(redis_url) as admin:
        assert await kill_clients_named(admin, "persister-publisher.w-kill") == 1
    await publisher.publish_position(2)
    assert await publisher.flush(5.0)
    await eventually(lambda: listener.of("w-kill")[-1] == position_command("w-kill", 1, 2))
    await publisher.close()


async def kill_clients_named(admin: Redis, name: str) -> int:
    clients = await admin.client_list()
    ids = [c["id"] for c in clients if c.get("name") == name]
    for client_id in ids:
        await admin.client_kill_filter(_id=client_id)
    return len(ids)


async def test_closing_ends_the_sender_even_if_redis_py_swallows_its_cancellation(
    redis_url: str, redis_channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    swallowed: list[asyncio.CancelledError] = []
    real_publish = Redis.publish
    publishing = asyncio.Event()

    async def publish_swallowing_a_cancellation(self: Redis, *args: Any, **kwargs: Any) -> Any:
        # What redis-py does when the cancellation lands in its read timeout
        # (redis/redis-py#2028, #2551): the call returns as if nothing happened.
        try:
            publishing.set()
            await asyncio.sleep(0.5)  # so that close() finds it here
            return await real_publish(self, *args, **kwargs)
        except asyncio.CancelledError as cancelled:
            swallowed.append(cancelled)
            return 0

    monkeypatch.setattr(Redis, "publish", publish_swallowing_a_cancellation)
    publisher = Publisher(redis_url, redis_channel, "w1")
    await publisher.start()
    await publisher.publish_position(0)
    await asyncio.wait_for(publishing.wait(), 2)
    closing = asyncio.ensure_future(publisher.close(flush_timeout_s=0))
    done, _ = await asyncio.wait([closing], timeout=3)
    if closing not in done:
        monkeypatch.undo()  # so that the next cancellation ends it, and the test with it
        assert publisher._sender is not None
        publisher._sender.cancel()
        await asyncio.wait([closing], timeout=5)
    assert closing in done, "the sender went on after its cancellation"
    assert swallowed, "the cancellation never reached redis-py: the test proved nothing"
