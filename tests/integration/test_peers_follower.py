"""Following the other writers on Redis (`persister.replication.peers`).

A writer's shutdown cancels its follower and waits for it. redis-py can
swallow a cancellation that lands in one of its read timeouts, after which
the read simply ends empty-handed; the follower must still stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from persister.replication.peers import READ_TIMEOUT_S, encode_drawn, follow_peers
from persister.replication.publisher import hints_channel
from tests.integration.stream_writers import eventually, until_subscribed


async def test_following_peers_ends_when_cancelled_even_if_redis_py_swallows_the_cancellation(
    redis_url: str, redis_channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    swallowed: list[asyncio.CancelledError] = []
    real_get_message = PubSub.get_message

    async def get_message_swallowing_a_cancellation(self: PubSub, *args: Any, **kwargs: Any) -> Any:
        # What redis-py does when the cancellation lands in its read timeout
        # (redis/redis-py#2028, #2551).
        try:
            return await real_get_message(self, *args, **kwargs)
        except asyncio.CancelledError as cancelled:
            swallowed.append(cancelled)
            return None

    monkeypatch.setattr(PubSub, "get_message", get_message_swallowing_a_cancellation)
    heard: list[int] = []
    follower = asyncio.create_task(
        follow_peers(redis_url, redis_channel, "persister1", heard.append)
    )
    peer = Redis.from_url(redis_url)
    try:
        await until_subscribed(peer, hints_channel(redis_channel))
        await peer.publish(hints_channel(redis_channel), encode_drawn("persister2", 42))
        await eventually(lambda: heard == [42], timeout=2)
    finally:
        await peer.aclose()

    follower.cancel()
    done, _ = await asyncio.wait([follower], timeout=READ_TIMEOUT_S + 2)
    if follower not in done:
        monkeypatch.undo()  # so that this cancellation ends it, and the test with it
        follower.cancel()
        await asyncio.wait([follower], timeout=5)
    assert follower in done, "the follower went on reading after its cancellation"
    assert follower.cancelled()
    assert swallowed, "the cancellation never reached redis-py: the test proved nothing"
