"""Watching the Redis channel during a fault test, and the checks run afterwards.

`ChannelRecorder` keeps, for every POSITION/RDATA on the channel:
- the time Redis executed the PUBLISH and which connection sent it (MONITOR;
  the sender is named by its address or its CLIENT LIST name), so a relay
  (a peer announcing for a dead writer) is told from the writer's own;
- the time a plain subscriber received it, and, whenever a writer's position
  rises, how many of that writer's events the database shows at or below
  it right then.

The checks are pure functions over what was recorded and what the database
holds at the end:

- `promise_violations`: an event of W with ordering <= a position P that W (or
  someone for W) had announced, committed after that announcement (commit
  times from `pg_xact_commit_timestamp`, so the cluster needs
  track_commit_timestamp = on). Contract section 6.
- `late_rows`: the same seen from the reader's side: an event that was not
  visible when the subscriber received the announcement covering it.
- `owner_violations`: an event written by an instance that did not own its
  room in the shard-map epoch in force when its ordering was drawn (epoch e
  covers orderings above its `sequence_at_start`; see
  persister.storage.shard_map for why that is exact).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from persister.replication.messages import Position, RData, decode_command
from persister.sharding import ShardMap

logger = logging.getLogger(__name__)

COUNT_UP_TO = """
    SELECT count(*) FROM events
    WHERE instance_name = %s AND stream_ordering > %s AND stream_ordering <= %s
"""


@dataclass(frozen=True)
class Announcement:
    at: float  # Redis executed the PUBLISH (MONITOR's clock: this machine's)
    instance: str  # whose position it is
    prev: int | None
    pos: int
    rows: int
    sender: str  # who published it: an instance name, or an address


@dataclass(frozen=True)
class Received:
    at: float
    instance: str
    pos: int


@dataclass(frozen=True)
class Snapshot:
    """At `at`, just after W's position `pos` arrived, W had `visible` events in (0, pos]."""

    at: float
    instance: str
    pos: int
    visible: int


@dataclass(frozen=True)
class StoredEvent:
    event_id: str
    room_id: str
    stream_ordering: int
    instance: str
    committed_at: float


@dataclass
class ChannelRecorder:
    redis_url: str
    channel: str
    database_url: str
    # Address of a sender -> the instance behind it, for senders outside
    # loopback (a test host has one persister).
    known_addresses: Mapping[str, str] = field(default_factory=dict)
    announcements: list[Announcement] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    # Announcements on the channel that could not be read (0 unless the
    # recorder misreads MONITOR): each is one the promise check never saw.
    unparsed: int = 0
    _names: dict[str, str] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, timeout_s: float = 5.0) -> None:
        self._tasks = [
            asyncio.create_task(self._subscribe(), name="recorder:subscribe"),
            asyncio.create_task(self._monitor(), name="recorder:monitor"),
            asyncio.create_task(self._poll_client_names(), name="recorder:names"),
        ]
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                logger.warning("recorder task failed: %r", result)

    def sender_name(self, client: str) -> str:
        address = client.rsplit(":", 1)[0]
        if address in self.known_addresses:
            return self.known_addresses[address]
        name = self._names.get(client, "")
        return name.removeprefix("persister-publisher.") or client

    async def _subscribe(self) -> None:
        client = Redis.from_url(self.redis_url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        last: dict[str, int] = {}
        visible: dict[str, int] = defaultdict(int)
        try:
            async with await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True
            ) as conn:
                await pubsub.subscribe(self.channel)
                self._ready.set()
                async for message in pubsub.listen():
                    at = time.time()
                    command = _decode(message.get("data"))
                    if command is None:
                        continue
                    self.received.append(Received(at, command.instance, command.pos))
                    w, pos = command.instance, command.pos
                    if pos <= last.get(w, 0):
                        continue
                    # Counted per new stretch: an event that turns up later in
                    # an older stretch breaks that stretch's snapshot anyway.
                    cur = await conn.execute(COUNT_UP_TO, (w, last.get(w, 0), pos))
                    row = await cur.fetchone()
                    visible[w] += int(row[0]) if row else 0
                    last[w] = pos
                    self.snapshots.append(Snapshot(at, w, pos, visible[w]))
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
                await client.aclose()

    async def _monitor(self) -> None:
        client = Redis.from_url(self.redis_url)
        prefix = f"PUBLISH {self.channel} "
        try:
            async with client.monitor() as monitor:
                while True:
                    info = await monitor.next_command()
                    text = info["command"]
                    if not text.upper().startswith(prefix.upper()):
                        continue
                    try:
                        command = decode_command(monitored_bytes(text[len(prefix) :]))
                    except msgspec.DecodeError:
                        self.unparsed += 1  # an announcement the checks would miss
                        continue
                    if not isinstance(command, Position | RData):
                        continue  # not a position (DRAWN, SHARDMAP)
                    sender = f"{info['client_address']}:{info['client_port']}"
                    self.announcements.append(
                        Announcement(
                            at=info["time"],
                            instance=command.instance,
                            prev=command.prev,
                            pos=command.pos,
                            rows=len(command.rows) if isinstance(command, RData) else 0,
                            sender=sender,
                        )
                    )
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _poll_client_names(self) -> None:
        client = Redis.from_url(self.redis_url)
        try:
            while True:
                with contextlib.suppress(RedisError, OSError):
                    await self.poll_names(client)
                await asyncio.sleep(0.2)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def poll_names(self, client: Redis) -> None:
        for entry in await client.client_list():
            if entry.get("name"):
                self._names[str(entry["addr"])] = str(entry["name"])

    def attributed(self) -> list[Announcement]:
        """Announcements with `sender` replaced by the sender's instance name."""
        return [
            Announcement(a.at, a.instance, a.prev, a.pos, a.rows, self.sender_name(a.sender))
            for a in self.announcements
        ]


# What MONITOR escapes in an argument (Redis's sdscatrepr), once redis-py has
# put back the quotes: backslashes, control characters and every non-ASCII
# byte. Left escaped, an RDATA whose rows hold any of them is not JSON.
_MONITOR_ESCAPE = re.compile(rb"\\(\\|n|r|t|a|b|x[0-9a-fA-F]{2})")
_MONITOR_UNESCAPED = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def monitored_bytes(text: str) -> bytes:
    """The bytes of an argument as redis-py's MONITOR reader shows it."""

    def unescape(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code.startswith(b"x"):
            return bytes([int(code[1:], 16)])
        return _MONITOR_UNESCAPED[code]

    return _MONITOR_ESCAPE.sub(unescape, text.encode())


def _decode(data: object) -> Position | RData | None:
    if not isinstance(data, bytes | str):
        return None
    try:
        command = decode_command(data)
    except msgspec.DecodeError:
        return None
    return command if isinstance(command, Position | RData) else None


# -- the checks -------------------------------------------------------------------


def _first_cover_times(
    announcements: Iterable[Announcement | Received],
) -> dict[str, tuple[list[int], list[float]]]:
    """Per instance: the running maximum of announced positions, at each rise."""
    steps: dict[str, tuple[list[int], list[float]]] = {}
    for a in sorted(announcements, key=lambda a: a.at):
        positions, times = steps.setdefault(a.instance, ([], []))
        if not positions or a.pos > positions[-1]:
            positions.append(a.pos)
            times.append(a.at)
    return steps


def promise_violations(
    announcements: Sequence[Announcement], events: Sequence[StoredEvent]
) -> list[str]:
    """Events committed after an announcement that covered their ordering."""
    steps = _first_cover_times(announcements)
    found = []
    for event in events:
        if event.stream_ordering <= 0 or event.instance not in steps:
            continue
        positions, times = steps[event.instance]
        i = bisect.bisect_left(positions, event.stream_ordering)
        if i < len(positions) and event.committed_at > times[i]:
            found.append(
                f"{event.event_id} (ordering {event.stream_ordering}, by {event.instance}) "
                f"committed {event.committed_at - times[i]:.6f}s after position "
                f"{positions[i]} was announced for {event.instance}"
            )
    return found


def late_rows(snapshots: Sequence[Snapshot], events: Sequence[StoredEvent]) -> list[str]:
    """Snapshots whose stretch gained events after the announcement was received."""
    orderings: dict[str, list[int]] = defaultdict(list)
    for event in events:
        if event.stream_ordering > 0:
            orderings[event.instance].append(event.stream_ordering)
    for values in orderings.values():
        values.sort()
    found = []
    for snap in snapshots:
        final = bisect.bisect_right(orderings.get(snap.instance, []), snap.pos)
        if final != snap.visible:
            found.append(
                f"{snap.instance} at position {snap.pos}: {snap.visible} events visible when "
                f"it was received, {final} in the end"
            )
    return found


def epoch_of(ordering: int, maps: Sequence[ShardMap]) -> ShardMap:
    """The map in force when `ordering` was drawn (maps sorted by epoch)."""
    starts = [m.start() for m in maps]
    i = bisect.bisect_left(starts, ordering) - 1
    if i < 0:
        raise ValueError(f"ordering {ordering} precedes every epoch")
    return maps[i]


def owner_violations(events: Sequence[StoredEvent], maps: Sequence[ShardMap]) -> list[str]:
    maps = sorted(maps, key=lambda m: m.epoch)
    writers: dict[tuple[str, int], set[str]] = defaultdict(set)
    found = []
    for event in events:
        if event.stream_ordering <= 0:
            continue
        shard_map = epoch_of(event.stream_ordering, maps)
        writers[(event.room_id, shard_map.epoch)].add(event.instance)
        owner = shard_map.owner(event.room_id)
        if owner != event.instance:
            found.append(
                f"{event.event_id} in {event.room_id} (ordering {event.stream_ordering}) "
                f"written by {event.instance}, owner in epoch {shard_map.epoch} is {owner}"
            )
    for (room, epoch), names in sorted(writers.items()):
        if len(names) > 1:
            found.append(f"{room} written by {sorted(names)} in epoch {epoch}")
    return found


def ack_problems(
    acks: Mapping[str, set[int]], stored: Mapping[str, list[int]]
) -> dict[str, list[str]]:
    """Every acknowledged event stored exactly once, at the ordering it was acknowledged with."""
    lost, duplicated, moved = [], [], []
    for event_id, orderings in acks.items():
        rows = stored.get(event_id, [])
        if not rows:
            lost.append(event_id)
        elif len(rows) > 1:
            duplicated.append(f"{event_id}: {rows}")
        elif orderings != {rows[0]}:
            moved.append(f"{event_id}: acknowledged as {sorted(orderings)}, stored at {rows[0]}")
    for event_id, rows in stored.items():
        if len(rows) > 1 and event_id not in acks:
            duplicated.append(f"{event_id}: {rows}")
    return {"lost": lost, "duplicated": duplicated, "ordering_changed": moved}


def as_stored_events(rows: Iterable[tuple[Any, ...]]) -> list[StoredEvent]:
    return [StoredEvent(str(e), str(r), int(o), str(i), float(t)) for e, r, o, i, t in rows]
