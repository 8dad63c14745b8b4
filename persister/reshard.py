"""`persister reshard`: change the writer pool while it runs (contract section 7).

The command returns once the new epoch is committed, which is when it is in
force (see the fence in `persister.storage.shard_map`). It then tells
everyone on the Redis channel; persisters and clients that miss the message
learn the map by polling and from 421 answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import msgspec
import psycopg

from persister.config import Config, ConfigError
from persister.replication.publisher import redis_client
from persister.sharding import ShardMap, moved_rooms
from persister.storage.shard_map import install_next_epoch, load_shard_map, stored_room_ids


class ShardMapAnnouncement(msgspec.Struct, frozen=True, tag_field="cmd", tag="SHARDMAP"):
    epoch: int
    writers: list[str]
    sharding: str
    pins: dict[str, str]


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
    async with await psycopg.AsyncConnection.connect(config.database.url) as conn:
        before, after = await install_next_epoch(conn, *seed, change)
        rooms = await stored_room_ids(conn)
    if after.epoch == before.epoch:
        return f"epoch {after.epoch} unchanged: the map already places rooms that way"
    await announce(config, after)
    moved = moved_rooms(rooms, before, after)
    return (
        f"epoch {after.epoch} in force: writers {','.join(after.writers)} "
        f"({after.sharding}), {len(after.pins)} pin(s); "
        f"{len(moved)} of {len(rooms)} stored rooms moved"
    )


async def announce(config: Config, shard_map: ShardMap) -> None:
    message = ShardMapAnnouncement(
        shard_map.epoch, list(shard_map.writers), shard_map.sharding, dict(shard_map.pins)
    )
    client = redis_client(config.redis.url)
    try:
        await client.publish(config.redis.channel, msgspec.json.encode(message))
    except OSError:
        pass  # Persisters poll the stored map; the announcement only speeds them up.
    finally:
        await client.aclose()


async def show(config: Config) -> str:
    async with await psycopg.AsyncConnection.connect(config.database.url) as conn:
        current = await load_shard_map(conn)
        if current is None:
            return "no stored shard map yet: the first persister seeds epoch 1 from the config"
        previous = await load_shard_map(conn, current.epoch - 1)
        rooms = await stored_room_ids(conn)
    lines = [
        f"epoch {current.epoch} ({current.sharding}), in force since stream position "
        f"{current.sequence_at_start}",
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
