"""The stored shard map and the fence that makes an epoch change safe.

Protocol (contract section 7):
- Every write transaction first takes the shard-map advisory lock SHARED
  for the rest of the transaction and then reads the epoch in force. The
  writer does this inside `persister_fence` (migrations/0004), together
  with its liveness fence, in one statement; `fence_txn` below is the same
  two steps on their own, for callers without a liveness epoch (tests,
  tools). The writer compares it with the map it routed by; on a
  mismatch it rolls back, reloads the map and answers 421 for moved rooms.
- `install_next_epoch` takes the same lock EXCLUSIVELY. It waits for every
  write transaction in flight to end, inserts the next epoch and commits.
  A write transaction that starts later blocks on the lock until then and
  reads the new epoch (each statement of READ COMMITTED takes a fresh
  snapshot, so the epoch is read after the lock is granted).
Hence no transaction of an older epoch commits once the new epoch is in
force. Rooms that do not move are held up only while the exclusive lock is
wanted (new transactions queue behind it until those in flight end: about
one transaction) and held (~15 ms under load, measured).

Because write transactions draw their orderings after the fence, the
sequence value that `install_next_epoch` reads under the exclusive lock
(`sequence_at_start`) splits the stream exactly: every event committed under
epoch k has `start_k < stream_ordering <= start_(k+1)`.

Readers take the lock SHARED too (`load_shard_map_fenced`), to wait out an
install whose announcement they may have missed (see
`persister.replication.shardmap`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from psycopg import AsyncConnection, AsyncCursor

from persister.sharding import Scheme, ShardMap
from persister.storage.streams import read_sequence_position

# An arbitrary constant naming the lock: "shardmap" in ASCII, as a bigint.
SHARD_MAP_LOCK: Final = 0x73686172646D6170

FENCE: Final = "SELECT pg_advisory_xact_lock_shared(%s)"
CURRENT_EPOCH: Final = "SELECT coalesce(max(epoch), 0) FROM shard_map_epochs"
LOCK_EXCLUSIVE: Final = "SELECT pg_advisory_xact_lock(%s)"
SELECT_CURRENT: Final = """
SELECT epoch, writers, sharding, sequence_at_start
FROM shard_map_epochs ORDER BY epoch DESC LIMIT 1
"""
SELECT_EPOCH: Final = """
SELECT epoch, writers, sharding, sequence_at_start FROM shard_map_epochs WHERE epoch = %s
"""
SELECT_PINS: Final = "SELECT room_id, instance_name FROM shard_map_pins WHERE epoch = %s"
INSERT_EPOCH: Final = """
INSERT INTO shard_map_epochs (epoch, writers, sharding, sequence_at_start, created_ts)
VALUES (%s, %s, %s, %s, %s)
"""
INSERT_PINS: Final = """
INSERT INTO shard_map_pins (epoch, room_id, instance_name)
SELECT %s, r, i FROM unnest(%s::text[], %s::text[]) AS u(r, i)
"""
SELECT_ROOM_IDS: Final = "SELECT room_id FROM rooms"
SELECT_ALL_EPOCHS: Final = "SELECT epoch FROM shard_map_epochs ORDER BY epoch"
# Writers some epoch named (in its list or as a pin target) that the map in
# force does not, and that have not yet promised a position at or above its
# start (or never stored one): their last orderings may still be unannounced.
SELECT_LEAVING: Final = """
SELECT named.instance_name
FROM (SELECT unnest(writers) AS instance_name FROM shard_map_epochs
      UNION SELECT instance_name FROM shard_map_pins) AS named
LEFT JOIN stream_positions AS p
       ON p.stream_name = 'events' AND p.instance_name = named.instance_name
WHERE NOT named.instance_name = ANY(%s) AND (p.stream_id IS NULL OR p.stream_id < %s)
ORDER BY named.instance_name
"""

Connection = AsyncConnection[Any]
# Runs inside the install, after the new epoch is written and before COMMIT.
BeforeCommit = Callable[[ShardMap], Awaitable[None]]


async def fence_txn(cur: AsyncCursor[Any]) -> int:
    """The epoch in force; no newer one can take force before this transaction ends."""
    # Keep in step with persister_fence (migrations/0004_batch_fence.sql).
    await cur.execute(FENCE, (SHARD_MAP_LOCK,))
    await cur.execute(CURRENT_EPOCH)
    row = await cur.fetchone()
    assert row is not None
    return cast(int, row[0])


async def load_shard_map(conn: Connection, epoch: int | None = None) -> ShardMap | None:
    """The map in force, or that of an older `epoch`; None if there is none."""
    if epoch is None:
        cur = await conn.execute(SELECT_CURRENT)
    else:
        cur = await conn.execute(SELECT_EPOCH, (epoch,))
    row = await cur.fetchone()
    if row is None:
        return None
    epoch, writers, sharding, sequence_at_start = row
    pins = await conn.execute(SELECT_PINS, (epoch,))
    return ShardMap(
        epoch=epoch,
        writers=tuple(writers),
        sharding=sharding,
        pins=dict(await pins.fetchall()),
        sequence_at_start=sequence_at_start,
    )


async def load_shard_map_fenced(conn: Connection) -> ShardMap | None:
    """The map in force once any install under way has committed or rolled back.

    Taking the lock shared waits for an install that holds it, so the map
    read is at least as new as every epoch whose install began before this
    call. `conn` must not be inside a transaction of the caller's.
    """
    async with conn.transaction():
        await conn.execute(FENCE, (SHARD_MAP_LOCK,))
        return await load_shard_map(conn)


async def load_all_epochs(conn: Connection) -> list[ShardMap]:
    """Every stored epoch, oldest first."""
    cur = await conn.execute(SELECT_ALL_EPOCHS)
    epochs = [epoch for (epoch,) in await cur.fetchall()]
    maps = [await load_shard_map(conn, epoch) for epoch in epochs]
    return [m for m in maps if m is not None]


async def leaving_writers(conn: Connection, current: ShardMap) -> set[str]:
    """Writers that `current` removed and that readers may still have to wait for.

    A writer outside the map in force commits nothing, and whatever it
    committed has an ordering <= `current.sequence_at_start`; once its
    stored position reaches that, readers can stop counting it.
    """
    cur = await conn.execute(
        SELECT_LEAVING, (sorted(current.all_writers()), current.sequence_at_start)
    )
    return {str(name) for (name,) in await cur.fetchall()}


async def load_or_seed(conn: Connection, writers: tuple[str, ...], sharding: Scheme) -> ShardMap:
    """The map in force; the first process to ask seeds epoch 1 from its config."""
    current = await load_shard_map(conn)
    if current is not None:
        return current
    _, installed = await install_next_epoch(conn, writers, sharding, lambda seed: seed)
    return installed


async def install_next_epoch(
    conn: Connection,
    writers: tuple[str, ...],
    sharding: Scheme,
    change: Callable[[ShardMap], ShardMap],
    *,
    before_commit: BeforeCommit | None = None,
) -> tuple[ShardMap, ShardMap]:
    """Put `change(current)` in force as the next epoch; returns (before, after).

    With no stored map yet, `writers`/`sharding` (from the config) seed it.
    `before_commit(after)` runs while the exclusive lock is held and the
    epoch is written but not committed; if it raises, nothing changes.
    """
    async with conn.transaction():
        await conn.execute(LOCK_EXCLUSIVE, (SHARD_MAP_LOCK,))
        current = await load_shard_map(conn)
        before = current or ShardMap(0, writers, sharding)
        wanted = change(before)
        if current is not None and _same_placement(current, wanted):
            return current, current
        sequence = await read_sequence_position(conn)
        after = ShardMap(before.epoch + 1, wanted.writers, wanted.sharding, wanted.pins, sequence)
        await conn.execute(
            INSERT_EPOCH,
            (after.epoch, list(after.writers), after.sharding, sequence, int(time.time() * 1000)),
        )
        if after.pins:
            await conn.execute(
                INSERT_PINS, (after.epoch, list(after.pins), list(after.pins.values()))
            )
        if before_commit is not None:
            await before_commit(after)
    return before, after


def _same_placement(a: ShardMap, b: ShardMap) -> bool:
    return a.writers == b.writers and a.sharding == b.sharding and dict(a.pins) == dict(b.pins)


async def stored_room_ids(conn: Connection) -> list[str]:
    cur = await conn.execute(SELECT_ROOM_IDS)
    return [room_id for (room_id,) in await cur.fetchall()]
