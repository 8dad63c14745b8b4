"""Following the other writers' hints, so an idle writer keeps up.

Readers take the minimum over all writers. A writer with nothing to do may
announce anything up to what the shared sequence has handed out; its
heartbeat reads the sequence once a second, which alone would keep the
minimum up to a second behind the busiest writer. So each writer says, as
soon as a fetch returns, how far the sequence has gone:

    {"cmd": "DRAWN", "stream": "events", "instance": "persister1", "reached": 1240}

a fact about the sequence, not a promise about any writer's rows (the
channel is trusted, as Synapse trusts its replication channel). Its peers
observe it like a position and, if idle, announce it at once, while the
busy writer is still writing and committing, so that when the busy
writer's own announcement arrives the readers' minimum moves with it.

It is a hint among writers, outside contract section 6, so it goes on a
channel of its own beside the contract's (`hints_channel`:
`<redis.channel>.hints`), and that channel is all a writer follows: DRAWN
hints and the SHARDMAP announcements, which `persister reshard` publishes
there as well as on the contract's channel. A writer does not follow its
peers' POSITION and RDATA: every draw that can matter to a peer comes with
a DRAWN (a writer hints whenever the pool it watches has another writer,
and readers wait on no writer outside that pool), and an idle writer's
heartbeat reads the sequence every second, which covers a lost hint. On
the contract's channel a writer was woken by every message of the pool,
its own among them (about four a transaction in a pool of two, one in a
pool of one); following only the hints spends 5-10 % less of its CPU per
single event (bench/README.md, seventeenth session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from persister.replication.messages import EVENTS_STREAM
from persister.replication.publisher import hints_channel, raise_if_cancelled, redis_client
from persister.replication.shardmap import ShardMapAnnouncement

logger = logging.getLogger(__name__)

OnPeerPosition = Callable[[int], None]
OnShardMap = Callable[[], None]


class Drawn(msgspec.Struct, frozen=True, tag_field="cmd", tag="DRAWN"):
    """The shared sequence has handed out `reached` (to `instance`)."""

    stream: str
    instance: str
    reached: int


_PeerCommand = Drawn | ShardMapAnnouncement
_peer_decoder: Final[msgspec.json.Decoder[_PeerCommand]] = msgspec.json.Decoder(_PeerCommand)
_encoder: Final = msgspec.json.Encoder()


def encode_drawn(instance: str, reached: int) -> bytes:
    return _encoder.encode(Drawn(EVENTS_STREAM, instance, reached))


async def follow_peers(
    redis_url: str,
    channel: str,
    instance: str,
    on_position: OnPeerPosition,
    on_shard_map: OnShardMap | None = None,
) -> None:
    """Call `on_position` with every DRAWN hint of another writer, and
    `on_shard_map` on every SHARDMAP message, both on the hints channel
    beside `channel`; runs until cancelled."""
    attempt = 0
    while True:
        try:
            await _follow(redis_url, channel, instance, on_position, on_shard_map)
        except (RedisError, OSError) as exc:
            attempt += 1
            if attempt == 1:
                logger.warning("following peers on Redis failed (%s); retrying", exc)
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        else:
            attempt = 0


async def _follow(
    redis_url: str,
    channel: str,
    instance: str,
    on_position: OnPeerPosition,
    on_shard_map: OnShardMap | None,
) -> None:
    client = redis_client(redis_url, f"peers:{instance}", reconnects=0)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(hints_channel(channel))
        while True:
            message = await pubsub.get_message(timeout=READ_TIMEOUT_S)
            raise_if_cancelled()
            if message is None:
                await pubsub.ping()  # a half-open connection shows as an error here
                continue
            command = _peer_command(message.get("data"))
            if isinstance(command, ShardMapAnnouncement):
                if on_shard_map is not None:
                    on_shard_map()
                continue
            position = _position_of(command, instance)
            if position is not None:
                on_position(position)
    finally:
        # Bounded: closing a half-open subscription can wait on its socket
        # indefinitely, and this runs while the task is cancelled at shutdown.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(_close(pubsub, client), CLOSE_TIMEOUT_S)


async def _close(pubsub: PubSub, client: Redis) -> None:
    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
    await client.aclose()


CLOSE_TIMEOUT_S: Final = 1.0
# How long a read waits for a message before pinging the connection.
READ_TIMEOUT_S: Final = 1.0


def peer_position(data: object, instance: str) -> int | None:
    """How far another writer's hint says the sequence has gone, if it is one."""
    return _position_of(_peer_command(data), instance)


def _peer_command(data: object) -> _PeerCommand | None:
    if not isinstance(data, bytes | str):
        return None
    try:
        return _peer_decoder.decode(data)
    except msgspec.DecodeError:
        return None  # anything else on the channel (a newer command, say)


def _position_of(command: _PeerCommand | None, instance: str) -> int | None:
    if not isinstance(command, Drawn):
        return None
    if command.stream != EVENTS_STREAM or command.instance == instance:
        return None
    return command.reached
