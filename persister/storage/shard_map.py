"""The stored shard map, and the fences that make an epoch change safe.

Protocol (contract section 7; SQL in migrations/0005_epoch_drain.sql):

- An epoch is *installed* (`install_next_epoch`): a new row, committed at
  once, with `sequence_at_start` NULL. Persisters and clients route by it
  from then on; it is not yet *in force*.
- Every write transaction first calls `shard_map_fence(routed_epoch)`
  (inside `persister_fence`, with the liveness fence): it takes the advisory
  lock (namespace, routed_epoch) SHARED and then reads the newest epoch. If
  that is newer, it takes that epoch's lock too and returns its map: the
  writer carries on under it when none of the batch's rooms moved, and
  rolls back and reroutes otherwise.
- The epoch is *drained* (`drain_epoch`, SQL `shard_map_drain`): once no
  transaction holds the lock of an epoch since the last one in force (each
  taken exclusively, by try-lock), the sequence position is recorded as its
  `sequence_at_start`, and it is in force. `persister reshard` drains right
  after installing; a writer about to commit a room it *gained* (owned by
  another writer under some epoch since the last one in force) drains first
  if nobody has, so an old owner's transaction in flight always ends before
  the new owner writes the room.

So rooms that do not move never wait on a lock: transactions of the new
epoch hold a different lock from those the drain waits for, and a
transaction begun under the old epoch carries on under the new one. Moved
rooms wait for the old owner's transactions in flight.

Because orderings are drawn after the fence, `sequence_at_start` still
splits the stream exactly: every event of an old owner's transaction has an
ordering at or below it (the drain waited for them), every event of a gained
room one above it (drawn after the drain). Events of rooms that did not move
may fall on either side, under the same owner. So every event's writer owns
its room under the in-force epoch whose `(start, next start]` holds its
ordering, and a writer that a new epoch removed commits nothing above it.

`SHARD_MAP_LOCK` now only orders installs: each install holds it
exclusively until its COMMIT, and `load_routing_fenced` / `load_maps_fenced`
take it shared to wait out an install whose announcement their caller may
have missed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NamedTuple, cast

import msgspec
from psycopg import AsyncConnection, AsyncCursor

from persister.sharding import Scheme, ShardMap
from persister.storage.streams import read_sequence_position

# An arbitrary constant naming the lock: "shardmap" in ASCII, as a bigint.
SHARD_MAP_LOCK: Final = 0x73686172646D6170

FENCE: Final = "SELECT * FROM shard_map_fence(%s)"
DRAIN: Final = "SELECT shard_map_drain(%s)"
LOCK_SHARED: Final = "SELECT pg_advisory_xact_lock_shared(%s)"
LOCK_EXCLUSIVE: Final = "SELECT pg_advisory_xact_lock(%s)"
# Every map load: the maps with their pins in one round trip (a writer reloads
# them when an install commits, and its lanes may be waiting for the answer).
SELECT_MAPS_WITH_PINS: Final = """
SELECT e.epoch, e.writers, e.sharding, e.sequence_at_start,
       (SELECT coalesce(json_object_agg(p.room_id, p.instance_name), '{}'::json)
        FROM shard_map_pins AS p WHERE p.epoch = e.epoch)
FROM shard_map_epochs AS e
"""
SELECT_NEWEST: Final = SELECT_MAPS_WITH_PINS + "ORDER BY e.epoch DESC LIMIT 1"
SELECT_EPOCH: Final = SELECT_MAPS_WITH_PINS + "WHERE e.epoch = %s"
SELECT_IN_FORCE: Final = (
    SELECT_MAPS_WITH_PINS + "WHERE e.sequence_at_start IS NOT NULL ORDER BY e.epoch DESC LIMIT 1"
)
SELECT_SINCE_IN_FORCE: Final = (
    SELECT_MAPS_WITH_PINS
    + """WHERE e.epoch >= (SELECT coalesce(max(epoch), 0) FROM shard_map_epochs
                   WHERE sequence_at_start IS NOT NULL)
ORDER BY e.epoch"""
)
INSERT_EPOCH: Final = """
INSERT INTO shard_map_epochs (epoch, writers, sharding, sequence_at_start, created_ts)
VALUES (%s, %s, %s, %s, %s)
"""
INSERT_PINS: Final = """
INSERT INTO shard_map_pins (epoch, room_id, instance_name)
SELECT %s, r, i FROM unnest(%s::text[], %s::text[]) AS u(r, i)
"""
SELECT_ROOM_IDS: Final = "SELECT room_id FROM rooms"
SELECT_ALL_EPOCHS: Final = SELECT_MAPS_WITH_PINS + "ORDER BY e.epoch"
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


class Fenced(NamedTuple):
    """What a write transaction's shard-map fence found."""

    epoch: int  # the newest; the transaction holds its lock
    in_force: bool
    # The newest map, when it is not the one the transaction routed by.
    newer: ShardMap | None


def fenced_from_row(row: Sequence[Any]) -> Fenced:
    """A row of `shard_map_fence` (or the shard-map part of `persister_fence`)."""
    epoch, start, writers, sharding, pins = row
    newer = None if writers is None else ShardMap(epoch, tuple(writers), sharding, pins, start)
    return Fenced(epoch, start is not None, newer)


async def fence_txn(cur: AsyncCursor[Any], routed_epoch: int) -> Fenced:
    """The shard-map fence alone (writers take it with their liveness fence,
    in `persister_fence`)."""
    await cur.execute(FENCE, (routed_epoch,))
    row = await cur.fetchone()
    assert row is not None
    return fenced_from_row(row)


async def drain_epoch(conn: Connection, epoch: int) -> int:
    """Put the installed `epoch` in force once the transactions of older
    epochs have ended (at once if it is); returns its `sequence_at_start`.
    Runs in its own short transaction: `conn` must not be inside one."""
    async with conn.transaction():
        cur = await conn.execute(DRAIN, (epoch,))
        row = await cur.fetchone()
    assert row is not None
    return cast(int, row[0])


async def load_shard_map(conn: Connection, epoch: int | None = None) -> ShardMap | None:
    """The newest map (it routes, in force or not), or that of `epoch`;
    None if there is none."""
    if epoch is None:
        maps = await _load_epochs(conn, SELECT_NEWEST)
    else:
        maps = await _load_epochs(conn, SELECT_EPOCH, (epoch,))
    return maps[0] if maps else None


async def load_in_force(conn: Connection) -> ShardMap | None:
    """The newest map in force (drained)."""
    maps = await _load_epochs(conn, SELECT_IN_FORCE)
    return maps[0] if maps else None


async def load_routing(conn: Connection) -> list[ShardMap]:
    """The maps from the newest in force to the newest, oldest first: the
    last one routes; a room whose owner differs in an earlier one is a
    gained room until the last one is drained."""
    return await _load_epochs(conn, SELECT_SINCE_IN_FORCE)


async def load_routing_fenced(conn: Connection) -> list[ShardMap]:
    """`load_routing` once any install under way has committed or rolled back."""
    async with conn.transaction():
        await conn.execute(LOCK_SHARED, (SHARD_MAP_LOCK,))
        return await load_routing(conn)


async def load_maps_fenced(conn: Connection) -> tuple[ShardMap | None, ShardMap | None]:
    """(the newest map in force, the newest map if it is still being drained),
    once any install under way has committed or rolled back.

    Taking the lock shared waits for an install that holds it, so the maps
    read are at least as new as every epoch whose install began before this
    call. `conn` must not be inside a transaction of the caller's.
    """
    async with conn.transaction():
        await conn.execute(LOCK_SHARED, (SHARD_MAP_LOCK,))
        newest = await load_shard_map(conn)
        if newest is None or newest.in_force:
            return newest, None
        return await load_in_force(conn), newest


async def load_all_epochs(conn: Connection) -> list[ShardMap]:
    """Every stored epoch, oldest first."""
    return await _load_epochs(conn, SELECT_ALL_EPOCHS)


async def _load_epochs(
    conn: Connection, query: str, params: tuple[Any, ...] = ()
) -> list[ShardMap]:
    cur = await conn.execute(query, params)
    return [
        ShardMap(epoch, tuple(writers), sharding, dict(pins), start)
        for epoch, writers, sharding, start, pins in await cur.fetchall()
    ]


async def leaving_writers(conn: Connection, current: ShardMap) -> set[str]:
    """Writers that `current` (in force) removed and that readers may still have to wait for.

    A writer outside the map in force commits nothing, and whatever it
    committed has an ordering <= `current.sequence_at_start`; once its
    stored position reaches that, readers can stop counting it.
    """
    assert current.in_force, "writers leave a map only once it is in force"
    cur = await conn.execute(
        SELECT_LEAVING, (sorted(current.all_writers()), current.sequence_at_start)
    )
    return {str(name) for (name,) in await cur.fetchall()}


async def load_or_seed(conn: Connection, writers: tuple[str, ...], sharding: Scheme) -> ShardMap:
    """The newest map; the first process to ask seeds epoch 1 from its config."""
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
    """Install `change(current)` as the next epoch; returns (before, after).

    The new epoch routes from its COMMIT on and takes force when drained
    (`drain_epoch`); the very first epoch is in force at once, for no
    transaction can be older than it. With no stored map yet,
    `writers`/`sharding` (from the config) seed it. `before_commit(after)`
    runs while the install lock is held and the epoch is written but not
    committed; if it raises, nothing changes.
    """
    async with conn.transaction():
        await conn.execute(LOCK_EXCLUSIVE, (SHARD_MAP_LOCK,))
        current = await load_shard_map(conn)
        before = current or ShardMap(0, writers, sharding)
        wanted = change(before)
        if current is not None and _same_placement(current, wanted):
            return current, current
        start = None if current is not None else await read_sequence_position(conn)
        after = ShardMap(before.epoch + 1, wanted.writers, wanted.sharding, wanted.pins, start)
        await conn.execute(
            INSERT_EPOCH,
            (after.epoch, list(after.writers), after.sharding, start, int(time.time() * 1000)),
        )
        if after.pins:
            await conn.execute(
                INSERT_PINS, (after.epoch, list(after.pins), list(after.pins.values()))
            )
        if before_commit is not None:
            await before_commit(after)
    return before, after


async def install_in_force(
    conn: Connection,
    writers: tuple[str, ...],
    sharding: Scheme,
    change: Callable[[ShardMap], ShardMap],
    *,
    before_commit: BeforeCommit | None = None,
) -> tuple[ShardMap, ShardMap]:
    """`install_next_epoch`, then `drain_epoch`: returns once the new epoch
    (or one an interrupted reshard left installed) is in force."""
    before, after = await install_next_epoch(
        conn, writers, sharding, change, before_commit=before_commit
    )
    if not after.in_force:
        start = await drain_epoch(conn, after.epoch)
        after = msgspec.structs.replace(after, sequence_at_start=start)
    return before, after


def _same_placement(a: ShardMap, b: ShardMap) -> bool:
    return a.writers == b.writers and a.sharding == b.sharding and dict(a.pins) == dict(b.pins)


async def stored_room_ids(conn: Connection) -> list[str]:
    cur = await conn.execute(SELECT_ROOM_IDS)
    return [room_id for (room_id,) in await cur.fetchall()]
