"""`persister reshard`: change the writer pool while it runs (contract section 7).

The command installs the next epoch (persisters route by it from its
COMMIT), drains it (waits for the old epoch's transactions in flight, then
records where the stream was) and returns once it is in force; see
`persister.storage.shard_map`. It announces the map twice
(`persister.replication.shardmap` says why), each time on the Redis channel
and on the hints channel beside it, which persisters follow
(`persister.replication.peers`): before the COMMIT, so that stream readers
know a new writer before it can write and persisters switch at the COMMIT,
and once in force, for clients, persisters and readers. If the first
announcement cannot be published, the reshard fails and nothing changes; a
lost second one only slows clients down (they also learn from 421 answers
and polling).

Run again after being interrupted, it drains an epoch left installed (and
persisters drain it themselves when they poll or gain a room).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import msgspec
import psycopg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from persister.config import Config, ConfigError
from persister.errors import PersisterError
from persister.replication.publisher import hints_channel, redis_client
from persister.replication.shardmap import encode_announcement
from persister.sharding import ShardMap, moved_rooms
from persister.storage.shard_map import install_in_force, load_shard_map, stored_room_ids

logger = logging.getLogger(__name__)


class AnnounceFailed(PersisterError):
    """The map could not be announced before its COMMIT; the reshard rolled back."""


Change = Callable[[ShardMap], ShardMap]


def with_writers(config: Config, writers: list[str]) -> Change:
    _check_known(config, writers)
    if len(set(writers)) != len(writers) or not writers:
        raise ConfigError("--writers needs one or more distinct instance names")
    return lambda current: msgspec.structs.replace(
        current, writers=tuple(writers), sharding=config.sharding
    )


def with_pin(config: Config, room_id: str, instance: str) -> Change:
    _check_known(config, [instance])
    return lambda current: msgspec.structs.replace(
        current, pins={**current.pins, room_id: instance}
    )


def without_pin(room_id: str) -> Change:
    def change(current: ShardMap) -> ShardMap:
        if room_id not in current.pins:
            raise ConfigError(f"{room_id} is not pinned")
        pins = {r: i for r, i in current.pins.items() if r != room_id}
        return msgspec.structs.replace(current, pins=pins)

    return change


def _check_known(config: Config, instances: list[str]) -> None:
    for instance in instances:
        if instance not in config.instance_map:
            raise ConfigError(f"{instance!r} is not in instance_map: add it to the config first")


async def apply_change(config: Config, change: Change) -> str:
    seed = (tuple(config.stream_writers.events), config.sharding)
    client = redis_client(config.redis.url, "persister-reshard")
    try:
        await _check_redis(client)

        async def announce_prepared(after: ShardMap) -> None:
            await _publish_prepared(client, config.redis.channel, after)

        async with await psycopg.AsyncConnection.connect(config.database.conninfo()) as conn:
            before, after = await install_in_force(
                conn, *seed, change, before_commit=announce_prepared
            )
            if after.epoch == before.epoch and before.in_force:
                return f"epoch {after.epoch} unchanged: the map already places rooms that way"
            announced = await _publish_in_force(client, config.redis.channel, after)
            if after.epoch == before.epoch:
                return f"epoch {after.epoch} (left installed by an interrupted reshard) in force"
            rooms = await stored_room_ids(conn)
    finally:
        await client.aclose()
    moved = moved_rooms(rooms, before, after)
    return (
        f"epoch {after.epoch} in force: writers {','.join(after.writers)} "
        f"({after.sharding}), {len(after.pins)} pin(s); "
        f"{len(moved)} of {len(rooms)} stored rooms moved"
        + ("" if announced else " (not announced on Redis: clients learn it by polling)")
    )


async def _check_redis(client: Redis) -> None:
    # Connected before the install: the install lock, which holds up every
    # process loading the map, is then held for one PUBLISH, not for a
    # connection set-up.
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise AnnounceFailed(f"cannot reach Redis ({exc}); nothing changed") from None


async def _announce(client: Redis, channel: str, message: bytes) -> None:
    """Readers and clients follow `channel`, persisters its hints channel:
    one round trip for both, so the install lock is held no longer."""
    async with client.pipeline(transaction=False) as both:
        both.publish(channel, message)
        both.publish(hints_channel(channel), message)
        await both.execute()


async def _publish_prepared(client: Redis, channel: str, shard_map: ShardMap) -> None:
    try:
        await _announce(client, channel, encode_announcement(shard_map, in_force=False))
    except (RedisError, OSError) as exc:
        raise AnnounceFailed(
            f"cannot announce epoch {shard_map.epoch} on Redis ({exc}); nothing changed"
        ) from None


async def _publish_in_force(client: Redis, channel: str, shard_map: ShardMap) -> bool:
    try:
        await _announce(client, channel, encode_announcement(shard_map, in_force=True))
    except (RedisError, OSError) as exc:
        # The epoch is in force already; persisters, clients and readers
        # poll the stored map, the message only speeds them up.
        logger.warning("epoch %d is in force but was not announced: %s", shard_map.epoch, exc)
        return False
    return True


async def show(config: Config) -> str:
    async with await psycopg.AsyncConnection.connect(config.database.conninfo()) as conn:
        current = await load_shard_map(conn)
        if current is None:
            return "no stored shard map yet: the first persister seeds epoch 1 from the config"
        previous = await load_shard_map(conn, current.epoch - 1)
        rooms = await stored_room_ids(conn)
    since = (
        f"in force since stream position {current.sequence_at_start}"
        if current.in_force
        else "installed, being drained (`persister reshard` again finishes it)"
    )
    lines = [
        f"epoch {current.epoch} ({current.sharding}), {since}",
        f"writers: {', '.join(current.writers)}",
    ]
    lines += [f"pin: {room} -> {instance}" for room, instance in sorted(current.pins.items())]
    owned = Counter(current.owner(room) for room in rooms)
    lines += [f"{writer}: {owned.get(writer, 0)} stored room(s)" for writer in current.writers]
    if previous is not None:
        moved = moved_rooms(rooms, previous, current)
        lines.append(f"moved from epoch {previous.epoch}: {len(moved)} room(s)")
        lines += [f"  {room} -> {owner}" for room, owner in sorted(moved.items())[:20]]
    return "\n".join(lines)


async def reshard_main(
    config: Config, writers: str | None, pin: list[str] | None, unpin: str | None, show_only: bool
) -> str:
    if show_only:
        return await show(config)
    if writers is not None:
        change = with_writers(config, [w.strip() for w in writers.split(",") if w.strip()])
    elif pin is not None:
        change = with_pin(config, pin[0], pin[1])
    elif unpin is not None:
        change = without_pin(unpin)
    else:
        raise ConfigError("say one of --writers, --pin, --unpin or --show")
    return await apply_change(config, change)
