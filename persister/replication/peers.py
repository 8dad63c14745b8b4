"""Following the other writers' announcements, so an idle writer keeps up.

Readers take the minimum over all writers. A writer with nothing to do may
announce anything up to what the shared sequence has handed out, and
another writer's announced position is such a value (the channel is
trusted, as Synapse trusts its replication channel). Advancing as soon as a
peer announces (rather than on the next one-second heartbeat) keeps the
minimum within milliseconds of the busiest writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec
from redis.exceptions import RedisError

from persister.replication.messages import EVENTS_STREAM, Position, RData, decode_command
from persister.replication.publisher import redis_client

logger = logging.getLogger(__name__)

OnPeerPosition = Callable[[int], None]


async def follow_peers(
    redis_url: str, channel: str, instance: str, on_position: OnPeerPosition
) -> None:
    """Call `on_position` with every position another writer announces; runs until cancelled."""
    attempt = 0
    while True:
        try:
            await _follow(redis_url, channel, instance, on_position)
        except (RedisError, OSError) as exc:
            attempt += 1
            if attempt == 1:
                logger.warning("following peers on Redis failed (%s); retrying", exc)
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        else:
            attempt = 0


async def _follow(redis_url: str, channel: str, instance: str, on_position: OnPeerPosition) -> None:
    client = redis_client(redis_url, f"peers:{instance}", reconnects=0)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        async for message in pubsub.listen():
            position = _peer_position(message.get("data"), instance)
            if position is not None:
                on_position(position)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await client.aclose()


def _peer_position(data: object, instance: str) -> int | None:
    if not isinstance(data, bytes | str):
        return None
    try:
        command = decode_command(data)
    except msgspec.DecodeError:
        return None
    if (
        isinstance(command, Position | RData)
        and command.stream == EVENTS_STREAM
        and command.instance != instance
    ):
        return command.pos
    return None
