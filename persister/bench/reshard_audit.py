"""What a reshard under load must not break, checked against the database.

`ChannelAudit` listens to the replication channel for the whole run and
notes, right after each POSITION/RDATA arrives, a snapshot of the database
(`pg_current_snapshot()`). The stream promise of contract section 6 (when W
announces P, W commits no more events with 0 < ordering <= P) then reads:
every event of W with ordering <= P was committed by a transaction visible
in that snapshot. The snapshot is taken a little after the publish, so a
late commit inside that sliver goes unseen; nothing is ever blamed wrongly.

The other checks (`verify`) read the tables after the run:

- every acknowledged event is stored, once;
- every event with `start_k < stream_ordering <= start_(k+1)` was written by
  the owner of its room under epoch k (orderings are drawn after the
  shard-map fence, so the epoch in force at commit is exactly the one whose
  range holds the ordering);
- the DAG tables follow from the events (contract section 4, no backfill or
  outliers in the workload): forward extremities are the non-rejected
  events no stored event lists as a prev, edges are the PDUs' prev_events,
  backward extremities the listed prevs that are not stored;
- a writer that a reshard adds is announced (the SHARDMAP sent before the
  COMMIT) before any position covering its first event reaches the channel,
  which is what lets readers add it without their minimum going back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
from psycopg import AsyncConnection
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from persister.replication.messages import EVENTS_STREAM, decode_command
from persister.replication.publisher import redis_client
from persister.replication.shardmap import ShardMapAnnouncement, decode_announcement
from persister.sharding import ShardMap
from persister.storage.shard_map import load_all_epochs

MAX_PROBLEMS = 20  # examples kept per check; the count is always exact


@dataclass(frozen=True)
class Checkpoint:
    """A position announcement as it arrived: `arrival` orders all messages."""

    arrival: int
    instance: str
    pos: int
    snapshot: int  # index into ChannelAudit.snapshots


@dataclass(frozen=True)
class Snapshot:
    xmin: int
    xmax: int
    in_progress: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, xid: int) -> bool:
        """Whether a transaction that committed (at some point) had committed
        when this snapshot was taken."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.in_progress)


@dataclass
class ChannelAudit:
    redis_url: str
    channel: str
    database_url: str
    checkpoints: list[Checkpoint] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    shard_maps: list[tuple[int, ShardMapAnnouncement]] = field(default_factory=list)
    arrivals: int = 0
    _task: asyncio.Task[None] | None = None
    _subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, timeout_s: float = 5.0) -> None:
        self._task = asyncio.create_task(self._run(), name="channel-audit")
        await asyncio.wait_for(self._subscribed.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if not self._task.cancelled() and self._task.exception() is not None:
                raise RuntimeError("the channel audit failed") from self._task.exception()

    async def _run(self) -> None:
        client = redis_client(self.redis_url, "persister-reshard-audit", reconnects=0)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            async with await AsyncConnection.connect(self.database_url, autocommit=True) as conn:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                while True:
                    await self._take_batch(pubsub, conn)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _take_batch(self, pubsub: PubSub, conn: AsyncConnection[Any]) -> None:
        first = await pubsub.get_message(timeout=1.0)
        if first is None:
            return
        batch = [first]
        while len(batch) < 1000:  # whatever else has arrived already
            more = await pubsub.get_message(timeout=0.0)
            if more is None:
                break
            batch.append(more)
        cur = await conn.execute("SELECT pg_current_snapshot()::text")
        row = await cur.fetchone()
        assert row is not None
        self.snapshots.append(Snapshot.parse(row[0]))
        for message in batch:
            self._note(message["data"], len(self.snapshots) - 1)

    def _note(self, data: bytes, snapshot: int) -> None:
        self.arrivals += 1
        try:
            command = decode_command(data)
        except msgspec.DecodeError:
            return
        if command is None:
            announced = decode_announcement(data)
            if announced is not None:
                self.shard_maps.append((self.arrivals, announced))
        elif command.stream == EVENTS_STREAM:
            self.checkpoints.append(
                Checkpoint(self.arrivals, command.instance, command.pos, snapshot)
            )


@dataclass
class Check:
    name: str
    checked: int = 0
    failures: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, example: str) -> None:
        self.failures += 1
        if len(self.examples) < MAX_PROBLEMS:
            self.examples.append(example)

    @property
    def ok(self) -> bool:
        return self.failures == 0

    def __str__(self) -> str:
        head = f"{self.name}: {self.checked} checked, {self.failures} failed"
        return head + "".join(f"\n  {e}" for e in self.examples)


@dataclass
class StoredEvent:
    ordering: int
    room_id: str
    instance: str
    xid: int


async def verify(
    database_url: str, acknowledged: Sequence[str], audit: ChannelAudit
) -> tuple[list[Check], list[ShardMap]]:
    """Every check of the module docstring; also returns the stored epochs."""
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        # Epochs that never took force (replaced while being drained) own nothing.
        epochs = [e for e in await load_all_epochs(conn) if e.in_force]
        events = await _stored_events(conn)
        checks = [
            await check_exactly_once(conn, acknowledged),
            check_owners(events, epochs),
            await check_dag(conn),
            check_stream_promise(events, audit),
            check_new_writers_announced_first(events, epochs, audit),
        ]
    return checks, epochs


async def _stored_events(conn: AsyncConnection[Any]) -> list[StoredEvent]:
    # xmin is a 32-bit xid; the snapshots speak 64-bit ones. A run is far
    # shorter than 2^32 transactions, so at most one epoch boundary lies
    # between a row and now.
    cur = await conn.execute("SELECT pg_current_xact_id()::text::bigint")
    row = await cur.fetchone()
    assert row is not None
    now = int(row[0])
    cur = await conn.execute(
        "SELECT stream_ordering, room_id, instance_name, xmin::text::bigint FROM events"
        " WHERE stream_ordering > 0 ORDER BY stream_ordering"
    )
    events = []
    for ordering, room_id, instance, xmin in await cur.fetchall():
        xid = (now >> 32 << 32) | int(xmin)
        if xid > now:
            xid -= 1 << 32
        events.append(StoredEvent(int(ordering), str(room_id), str(instance), xid))
    return events


async def check_exactly_once(conn: AsyncConnection[Any], acknowledged: Sequence[str]) -> Check:
    check = Check("every acknowledged event stored exactly once")
    wanted = sorted(set(acknowledged))
    check.checked = len(wanted)
    stored: dict[str, int] = {}
    for start in range(0, len(wanted), 10_000):
        cur = await conn.execute(
            "SELECT event_id, count(*) FROM events WHERE event_id = ANY(%s) GROUP BY event_id",
            (wanted[start : start + 10_000],),
        )
        stored.update({str(e): int(n) for e, n in await cur.fetchall()})
    for event_id in wanted:
        count = stored.get(event_id, 0)
        if count != 1:
            check.fail(f"{event_id} stored {count} times")
    cur = await conn.execute("SELECT count(*) - count(DISTINCT event_id) FROM events")
    row = await cur.fetchone()
    if row is not None and row[0]:
        check.fail(f"{row[0]} events rows repeat an event_id")
    return check


def epoch_of(ordering: int, epochs: Sequence[ShardMap]) -> ShardMap:
    """The epoch whose range (start_k, start_(k+1)] holds `ordering`."""
    starts = [e.start() for e in epochs]
    return epochs[max(0, bisect.bisect_left(starts, ordering) - 1)]


def check_owners(events: Sequence[StoredEvent], epochs: Sequence[ShardMap]) -> Check:
    check = Check("each event written by its room's owner under the epoch of its ordering")
    for event in events:
        check.checked += 1
        epoch = epoch_of(event.ordering, epochs)
        owner = epoch.owner(event.room_id)
        if owner != event.instance:
            check.fail(
                f"ordering {event.ordering} in {event.room_id} by {event.instance}, "
                f"but epoch {epoch.epoch} (from {epoch.sequence_at_start}) gives {owner}"
            )
    return check


# Each query returns the rows that break one rule of contract section 4.
_DAG_RULES: dict[str, str] = {
    "a forward extremity that a stored event lists as a prev, or is rejected": """
        SELECT f.room_id, f.event_id FROM event_forward_extremities f
        LEFT JOIN events e ON e.event_id = f.event_id
        WHERE e.event_id IS NULL OR e.room_id <> f.room_id OR e.outlier
           OR e.rejection_reason IS NOT NULL
           OR EXISTS (SELECT 1 FROM event_edges g JOIN events c ON c.event_id = g.event_id
                      WHERE g.prev_event_id = f.event_id AND NOT c.outlier)
    """,
    "an event no stored event lists as a prev that is not a forward extremity": """
        SELECT e.room_id, e.event_id FROM events e
        WHERE NOT e.outlier AND e.rejection_reason IS NULL AND e.stream_ordering > 0
          AND NOT EXISTS (SELECT 1 FROM event_edges g JOIN events c ON c.event_id = g.event_id
                          WHERE g.prev_event_id = e.event_id AND NOT c.outlier)
          AND NOT EXISTS (SELECT 1 FROM event_forward_extremities f
                          WHERE f.room_id = e.room_id AND f.event_id = e.event_id)
    """,
    "a prev_event of a stored event without its edge, or an edge no PDU lists": """
        (SELECT j.event_id, p.prev FROM event_json j
           JOIN events e ON e.event_id = j.event_id AND e.rejection_reason IS NULL,
           jsonb_array_elements_text(j.json::jsonb -> 'prev_events') AS p(prev)
         EXCEPT SELECT event_id, prev_event_id FROM event_edges)
        UNION ALL
        (SELECT event_id, prev_event_id FROM event_edges
         EXCEPT SELECT j.event_id, p.prev FROM event_json j,
           jsonb_array_elements_text(j.json::jsonb -> 'prev_events') AS p(prev))
    """,
    "a backward extremity that is stored, or a missing prev that is not one": """
        (SELECT b.room_id, b.event_id FROM event_backward_extremities b
         JOIN events e ON e.event_id = b.event_id AND NOT e.outlier)
        UNION ALL
        (SELECT c.room_id, g.prev_event_id FROM event_edges g
         JOIN events c ON c.event_id = g.event_id AND NOT c.outlier
         WHERE NOT EXISTS (SELECT 1 FROM events p
                           WHERE p.event_id = g.prev_event_id AND NOT p.outlier)
           AND NOT EXISTS (SELECT 1 FROM event_backward_extremities b
                           WHERE b.room_id = c.room_id AND b.event_id = g.prev_event_id))
    """,
    "a topological ordering that is not the PDU's depth": """
        SELECT e.event_id, e.topological_ordering FROM events e JOIN event_json j USING (event_id)
        WHERE e.topological_ordering <> (j.json::jsonb ->> 'depth')::bigint
    """,
}


async def check_dag(conn: AsyncConnection[Any]) -> Check:
    check = Check("DAG tables follow from the stored events")
    cur = await conn.execute("SELECT count(*) FROM events")
    row = await cur.fetchone()
    check.checked = int(row[0]) if row else 0
    for rule, sql in _DAG_RULES.items():
        cur = await conn.execute(sql)
        for broken in await cur.fetchall():
            check.fail(f"{rule}: {broken}")
    return check


def check_stream_promise(events: Sequence[StoredEvent], audit: ChannelAudit) -> Check:
    """At each announcement (W, P), every event of W at or below P had committed.

    Per writer, the first announcement (in arrival order) whose position
    reaches an event's ordering is the one that binds: later ones come with
    later snapshots, which see whatever an earlier one saw.
    """
    check = Check("no event committed after a position covering it was announced (section 6)")
    by_writer: dict[str, list[Checkpoint]] = {}
    for checkpoint in audit.checkpoints:
        by_writer.setdefault(checkpoint.instance, []).append(checkpoint)
    reach: dict[str, list[int]] = {}
    for writer, checkpoints in by_writer.items():
        highest = 0
        reach[writer] = []
        for checkpoint in checkpoints:
            highest = max(highest, checkpoint.pos)
            reach[writer].append(highest)
    for event in events:
        covered = reach.get(event.instance)
        if covered is None:
            continue
        index = bisect.bisect_left(covered, event.ordering)
        if index == len(covered):
            continue  # never covered by an announcement we heard
        check.checked += 1
        checkpoint = by_writer[event.instance][index]
        if not audit.snapshots[checkpoint.snapshot].sees(event.xid):
            check.fail(
                f"{event.instance} announced {checkpoint.pos} before committing "
                f"ordering {event.ordering} (xid {event.xid})"
            )
    return check


def check_new_writers_announced_first(
    events: Sequence[StoredEvent], epochs: Sequence[ShardMap], audit: ChannelAudit
) -> Check:
    check = Check("a reshard's SHARDMAP precedes every position covering a new writer's event")
    prepared = {a.epoch: arrival for arrival, a in audit.shard_maps if not a.in_force}
    by_arrival = sorted(audit.checkpoints, key=lambda c: c.arrival)
    for before, after in zip(epochs, epochs[1:], strict=False):
        for writer in sorted(after.all_writers() - before.all_writers()):
            first = next(
                (e.ordering for e in events
                 if e.instance == writer and e.ordering > after.start()),
                None,
            )  # fmt: skip
            if first is None:
                continue  # it wrote nothing under that epoch
            check.checked += 1
            announced_at = prepared.get(after.epoch)
            if announced_at is None:
                check.fail(f"epoch {after.epoch} adding {writer}: no SHARDMAP heard before COMMIT")
                continue
            early = next((c for c in by_arrival if c.pos >= first), None)
            if early is not None and early.arrival < announced_at:
                check.fail(
                    f"epoch {after.epoch}: {early.instance} announced {early.pos} >= "
                    f"{writer}'s first ordering {first} before the SHARDMAP"
                )
    return check


def stored_rooms_moved(rooms: Sequence[str], before: ShardMap, after: ShardMap) -> set[str]:
    return {room for room in rooms if before.owner(room) != after.owner(room)}


async def events_per_room(database_url: str, upto: int) -> dict[str, int]:
    """Stored events per room with 0 < ordering <= `upto`."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT room_id, count(*) FROM events WHERE stream_ordering > 0"
            " AND stream_ordering <= %s GROUP BY room_id",
            (upto,),
        )
        return {str(room): int(n) for room, n in await cur.fetchall()}
