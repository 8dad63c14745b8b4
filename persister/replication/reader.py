"""The reader library a downstream worker embeds to follow the events stream.

    reader = StreamReader(redis_url, channel, database_url, ["persister1", "persister2"])
    await reader.start()
    async with contextlib.aclosing(reader.rows()) as rows:   # aclosing: may stop early
        async for row in rows:                               # each event once, in order
            ...
    reader.complete_up_to(); reader.token(); await reader.wait_for(pos, timeout=5)

Messages are hints, the database is the truth. Per instance the reader keeps
`cur`: the newest position it accepted. The stream is complete up to the
minimum of the writers' `cur` (never lower than before). Rows come from a
buffer fed by RDATA while every message continues the previous one, and from
the database (`rows_between`) for any stretch the buffer cannot vouch for:

    buffer invariant: for every tracked instance W, the buffer holds all of
    W's rows with covered_from < stream_ordering <= cur[W].

A message (prev, pos, rows) from W carries all of W's rows in (prev, pos]
(see `messages.py`), so:

- `pos <= cur[W]`: old news, ignored;
- `prev <= cur[W] < pos`: the chain continues; rows above cur[W] are new;
- `prev > cur[W]` (missed messages, a reconnect, a restarted or relayed
  writer, `prev == pos` "go to the database"): nothing is known about W's
  rows in (cur[W], prev], so `covered_from` rises to prev and the consumer
  reads everything up to there from the database.

Rows are handed out only up to complete_up_to, where the database is
complete too, so reading from either source gives the same rows; the
`delivered` mark makes each row go out once. After every re-subscription
(a reconnect, a Redis restart) the reader also reads `stream_positions`,
which are promises like POSITION messages, so a reader that missed messages
need not wait for the next one to notice.

Rows of instances outside `writers` are delivered if they are announced, but
nothing waits for them, so the writer set must be complete. By default the
reader takes it from the stored shard map (contract section 7; `writers`
only seeds it until a map is stored): the map's writers and pin targets,
plus the writers a newer map removed, until each has announced the new
epoch's `sequence_at_start` (everything it ever committed is at or below
that; a peer announces for it if it is dead). So the minimum never goes
back when a writer leaves, and a new writer joins at the minimum without
pulling it back, because the reader hears of it before anything could
carry the minimum past its first event: `persister reshard` announces the
map before its COMMIT, and Redis delivers in publish order
(`persister.replication.shardmap`). For what a subscription may have
missed, every (re)subscription reads the stored positions and then the map,
waiting out an install in progress; a poll of the map completes removals
whose SHARDMAP message was lost.

With `catch_up_url=` (one persister's base URL, or several to fail over
between) the stretches the buffer cannot vouch for come from the persisters'
catch-up API (`persister.replication.catchup`) instead of the `events`
table; the database is then read only for the starting point, writer ids
and stored positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Protocol, TypeVar

import msgspec
import psycopg
from psycopg import AsyncConnection
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from sortedcontainers import SortedDict  # type: ignore[import-untyped, unused-ignore]

from persister.replication.catchup import CatchUpClient, CatchUpUnavailable
from persister.replication.messages import (
    EVENTS_STREAM,
    Command,
    EventRow,
    RData,
    decode_command,
)
from persister.replication.publisher import redis_client
from persister.replication.shardmap import ShardMapAnnouncement, decode_announcement
from persister.sharding import ShardMap
from persister.storage.shard_map import leaving_writers, load_maps_fenced
from persister.storage.streams import (
    ensure_instance_ids,
    read_sequence_position,
    read_stream_positions,
    rows_between,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ROWS_PER_QUERY: Final = 500
MAX_BUFFERED_ROWS: Final = 10_000
SHARD_MAP_POLL_S: Final = 1.0
# Messages that arrive while start() reads the database are kept for after.
MAX_EARLY_MESSAGES: Final = 100_000
# Writers announce at least every second, so a silent subscription is a dead one
# (a half-open TCP connection never errors): ping, and reconnect if even
# the pong does not come.
PING_INTERVAL_S: Final = 1.0
# How long close() waits for its tasks to end once cancelled.
CLOSE_TIMEOUT_S: Final = 5.0
SILENCE_LIMIT_S: Final = 5.0
RETRY_INITIAL_S: Final = 0.05
RETRY_MAX_S: Final = 1.0

_TOKEN: Final = re.compile(r"^(?:s(\d+)|m(\d+)((?:~\d+\.\d+)+))$")


class _SortedRows(Protocol):
    """The part of SortedDict[int, EventRow] used here."""

    def __setitem__(self, key: int, value: EventRow) -> None: ...
    def __len__(self) -> int: ...
    def peekitem(self, index: int = -1) -> tuple[int, EventRow]: ...
    def popitem(self, index: int = -1) -> tuple[int, EventRow]: ...
    def irange(self, minimum: int | None = None, maximum: int | None = None) -> Iterator[int]: ...


class StreamState:
    """The reader's bookkeeping without I/O (see the module docstring)."""

    def __init__(
        self, writers: Iterable[str], start: int, *, max_buffered_rows: int = MAX_BUFFERED_ROWS
    ) -> None:
        self._writers = frozenset(writers)
        self._cur: dict[str, int] = dict.fromkeys(self._writers, start)
        self._floor = start
        self._covered_from = start
        self._delivered = start
        self._buffer: _SortedRows = SortedDict()
        self._max_buffered = max_buffered_rows
        # Removed writers still counted, each until it reaches its position.
        self._leaving: dict[str, int] = {}

    @property
    def writers(self) -> frozenset[str]:
        return self._writers

    def leaving(self) -> dict[str, int]:
        """Writers a shard map removed that still count, with the position
        each must reach first."""
        return dict(self._leaving)

    def complete_up_to(self) -> int:
        return self._floor

    def positions(self) -> dict[str, int]:
        return {writer: self._cur[writer] for writer in sorted(self._writers)}

    def known(self, instance: str) -> int | None:
        return self._cur.get(instance)

    def delivered(self) -> int:
        return self._delivered

    def covered_from(self) -> int:
        return self._covered_from

    def buffered(self) -> int:
        return len(self._buffer)

    def apply(self, command: Command) -> bool:
        """Take in one message; True if anything changed."""
        if command.stream != EVENTS_STREAM:
            return False
        rows = command.rows if isinstance(command, RData) else ()
        return self._advance(command.instance, command.prev, command.pos, rows)

    def apply_stored_position(self, instance: str, position: int) -> bool:
        """A `stream_positions` row: a promise that vouches for no rows."""
        return self._advance(instance, position, position, ())

    def set_writers(self, writers: Iterable[str]) -> None:
        new = frozenset(writers)
        for writer in new - self._writers:
            known = self._cur.get(writer)
            if known is None or known < self._floor:
                # Counting it lower would move the minimum back. What it
                # wrote up to there comes from the database, with the rest.
                self._raise_coverage(self._floor)
                self._cur[writer] = self._floor
        self._writers = new
        for writer in [w for w in self._leaving if w not in new]:
            del self._leaving[writer]
        self._recompute()

    def apply_shard_map(
        self, writers: Iterable[str], sequence_at_start: int, *, in_force: bool
    ) -> bool:
        """Follow a shard map; `writers` are the ones it names (its list and
        pin targets). True if the writer set changed.

        Its writers count from now on: a new one joins at the minimum, so
        the minimum never moves back. If the map is in force, writers it
        does not name *leave*: they commit nothing under it, and everything
        they committed has an ordering <= `sequence_at_start`, so each keeps
        counting until it has announced that far, then drops out. (A map not
        yet in force may still roll back: it only adds.)
        """
        named = frozenset(writers)
        before = self._writers
        for writer in named:
            self._leaving.pop(writer, None)
        self.set_writers(self._writers | named)
        if in_force:
            for writer in self._writers - named:
                self._leaving[writer] = max(self._leaving.get(writer, 0), sequence_at_start)
            self._retire_arrived()
        return self._writers != before

    def has_deliverable(self) -> bool:
        return self._floor > self._delivered

    def db_range(self) -> tuple[int, int] | None:
        """(from_exclusive, to_inclusive) to read from the database next, if any."""
        if self._delivered < min(self._covered_from, self._floor):
            return self._delivered, min(self._covered_from, self._floor)
        return None

    def next_buffered_row(self) -> EventRow | None:
        """The next row to deliver from the buffer, marked delivered; None when
        nothing is deliverable from there (check `db_range` first)."""
        if self.db_range() is not None or not self.has_deliverable():
            return None
        if len(self._buffer):
            ordering, row = self._buffer.peekitem(0)
            if ordering <= self._floor:
                self._buffer.popitem(0)
                self._delivered = ordering
                return row
        # No buffered row up to the floor: by the invariant there is none.
        self._delivered = self._floor
        return None

    def mark_delivered(self, upto: int) -> None:
        """Rows up to `upto` went out (read from the database)."""
        if upto <= self._delivered:
            return
        self._delivered = upto
        self._drop_buffered_upto(upto)

    def _advance(self, instance: str, prev: int | None, pos: int, rows: Iterable[EventRow]) -> bool:
        cur = self._cur.get(instance)
        if cur is not None and pos <= cur:
            return False
        if cur is None or prev is None or prev > cur:
            self._raise_coverage(pos if prev is None else prev)
        lowest_new = max(self._covered_from, self._delivered)
        for row in rows:
            if row.stream_ordering > lowest_new:
                self._buffer[row.stream_ordering] = row
        self._cur[instance] = pos
        self._trim()
        if instance in self._leaving:
            self._retire_arrived()
        self._recompute()
        return True

    def drop_leaving(self, writer: str) -> bool:
        """Stop counting a leaving writer now: the caller knows it has
        nothing left to announce (and applied its stored position first)."""
        if writer not in self._leaving:
            return False
        del self._leaving[writer]
        self._writers = self._writers - {writer}
        self._recompute()
        return True

    def _retire_arrived(self) -> None:
        arrived = [w for w, at in self._leaving.items() if self._cur.get(w, at - 1) >= at]
        for writer in arrived:
            del self._leaving[writer]
        if arrived:
            # Dropping a writer from the minimum can only raise it.
            self._writers = self._writers - frozenset(arrived)
            self._recompute()

    def _raise_coverage(self, upto: int) -> None:
        if upto > self._covered_from:
            self._covered_from = upto
            self._drop_buffered_upto(upto)

    def _drop_buffered_upto(self, upto: int) -> None:
        while len(self._buffer) and self._buffer.peekitem(0)[0] <= upto:
            self._buffer.popitem(0)

    def _trim(self) -> None:
        # The oldest rows go first; the database still has them.
        while len(self._buffer) > self._max_buffered:
            ordering, _ = self._buffer.popitem(0)
            self._covered_from = max(self._covered_from, ordering)

    def _recompute(self) -> None:
        if self._writers:
            self._floor = max(self._floor, min(self._cur[w] for w in self._writers))


def format_token(minimum: int, ahead: dict[int, int]) -> str:
    """Synapse's form: `s{min}`, or `m{min}~{id}.{pos}~...` for writers ahead of it."""
    if not ahead:
        return f"s{minimum}"
    parts = "~".join(f"{instance_id}.{pos}" for instance_id, pos in sorted(ahead.items()))
    return f"m{minimum}~{parts}"


def parse_token(token: str) -> tuple[int, dict[int, int]]:
    """The inverse of `format_token`: (minimum, {instance_id: position})."""
    match = _TOKEN.match(token)
    if match is None:
        raise ValueError(f"not a stream token: {token!r}")
    if match.group(1) is not None:
        return int(match.group(1)), {}
    ahead = {}
    for part in match.group(3).lstrip("~").split("~"):
        instance_id, _, pos = part.partition(".")
        ahead[int(instance_id)] = int(pos)
    return int(match.group(2)), ahead


class ReaderClosed(Exception):
    """The reader was closed while a caller waited on it."""


class StreamReader:
    def __init__(
        self,
        redis_url: str,
        channel: str,
        database_url: str,
        writers: Sequence[str],
        *,
        from_position: int | None = None,
        max_buffered_rows: int = MAX_BUFFERED_ROWS,
        subscribe_timeout_s: float | None = 5.0,
        catch_up_url: str | Sequence[str] | None = None,
        catch_up_secret: str | None = None,
        follow_shard_map: bool = True,
        shard_map_poll_s: float = SHARD_MAP_POLL_S,
    ) -> None:
        """`from_position`: deliver rows after it (default: where the stream is
        complete now, from the database). `subscribe_timeout_s`: how long
        `start` waits for Redis before failing (None: do not wait).
        `catch_up_url`: read missed rows from this persister's (or these
        persisters') catch-up API, authenticating with `catch_up_secret` (the
        replication secret), instead of from the database.
        `follow_shard_map`: take the writer set from the stored shard map (see
        the module docstring), polling it every `shard_map_poll_s`; False:
        exactly `writers`, changed only by `set_writers`."""
        self._catch_up: CatchUpClient | None = None
        if catch_up_url is not None:
            if catch_up_secret is None:
                raise ValueError("catch_up_url needs catch_up_secret (the replication secret)")
            urls = [catch_up_url] if isinstance(catch_up_url, str) else list(catch_up_url)
            self._catch_up = CatchUpClient(urls, catch_up_secret)
        self._redis_url = redis_url
        self._channel = channel
        self._database_url = database_url
        self._writers = list(writers)
        self._from_position = from_position
        self._max_buffered = max_buffered_rows
        self._subscribe_timeout_s = subscribe_timeout_s
        self._state: StreamState | None = None
        self._ids: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._conn: AsyncConnection[Any] | None = None
        self._closed = False
        self._consuming = False
        self._redis_failing = False
        self.subscriptions = 0  # how often it (re)subscribed; for tests and metrics
        self.database_reads = 0  # how often rows came from the database
        self.catch_up_reads = 0  # how often rows came from the catch-up API
        self._follow_map = follow_shard_map
        self._map_poll_s = shard_map_poll_s
        self._map_epoch = 0  # the newest epoch in force that was applied
        self._prepared_epoch = 0  # the newest epoch announced before its COMMIT
        # The newest map seen before it took force (announced before its
        # COMMIT, or stored while being drained): its writers stay counted
        # when an older map takes force.
        self._prepared: ShardMap | None = None
        self._map_poller: asyncio.Task[None] | None = None
        self._map_conn: AsyncConnection[Any] | None = None
        self._early: list[bytes] = []
        self._early_overflowed = False
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # Subscribed first, then the database: what was published before the
        # subscription is in the database by the time it is read (messages
        # that come meanwhile wait in `_early`).
        self._listener = asyncio.create_task(self._listen_forever(), name="stream-reader")
        if self._subscribe_timeout_s is not None:
            try:
                await asyncio.wait_for(self._subscribed.wait(), self._subscribe_timeout_s)
            except TimeoutError:
                await self.close()
                raise ConnectionError(
                    f"cannot subscribe to {self._channel!r} on Redis within "
                    f"{self._subscribe_timeout_s} s"
                ) from None
        read_after_subscribing = self._subscribed.is_set()
        try:
            async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
                state = await self._initial_state(conn)
                # No await from here to the end of the replay: messages must
                # be applied in the order they came (a SHARDMAP before the
                # positions after it).
                self._state = state
                early, self._early = self._early, []
                for data in early:
                    self._on_data(data)
                self._writers = sorted(state.writers)
                self._ids.update(await ensure_instance_ids(conn, self._writers))
        except BaseException:
            await self.close()
            raise
        if self._early_overflowed or (not read_after_subscribing and self._subscribed.is_set()):
            self._start_refresh()  # the subscription came during the read: read again
        if self._follow_map:
            self._map_poller = asyncio.create_task(self._poll_map_forever(), name="reader-map")

    async def _initial_state(self, conn: AsyncConnection[Any]) -> StreamState:
        """Where the stream is complete, over the right writers (see
        `persister.storage.streams.complete_position`: the sequence is read
        before the stored positions; the map, fenced, after them)."""
        sequence = await read_sequence_position(conn)
        stored = await read_stream_positions(conn)
        in_force, draining = await load_maps_fenced(conn) if self._follow_map else (None, None)
        writers = set(self._writers)
        if in_force is not None:
            writers = in_force.all_writers() | await leaving_writers(conn, in_force)
        if draining is not None:
            writers |= draining.all_writers()
        start = self._from_position
        if start is None:
            start = min((stored.get(w, sequence) for w in writers), default=sequence)
        state = StreamState(writers, start, max_buffered_rows=self._max_buffered)
        if in_force is not None:
            state.apply_shard_map(in_force.all_writers(), in_force.start(), in_force=True)
            self._map_epoch = in_force.epoch
        if draining is not None:
            state.apply_shard_map(draining.all_writers(), 0, in_force=False)
            self._prepared_epoch = draining.epoch
            self._prepared = draining
        return state

    async def close(self) -> None:
        self._closed = True
        self._notify()
        tasks = [t for t in (self._listener, self._refresh, self._map_poller, *self._background)
                 if t is not None]  # fmt: skip
        for task in tasks:
            task.cancel()
        if tasks:
            ended, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            for task in ended:
                if not task.cancelled() and task.exception() is not None:
                    logger.warning("stream reader: %s had failed: %r",
                                   task.get_name(), task.exception())  # fmt: skip
            if stuck:
                logger.warning("stream reader: %s did not stop when cancelled",
                               ", ".join(t.get_name() for t in stuck))  # fmt: skip
        self._listener = self._refresh = self._map_poller = None
        await self._drop_connection()
        if self._map_conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._map_conn.close()
            self._map_conn = None
        if self._catch_up is not None:
            await self._catch_up.close()

    @property
    def state(self) -> StreamState:
        if self._state is None:
            raise RuntimeError("StreamReader.start() has not run")
        return self._state

    def positions(self) -> dict[str, int]:
        return self.state.positions()

    def complete_up_to(self) -> int:
        return self.state.complete_up_to()

    def token(self) -> str:
        minimum = self.complete_up_to()
        # A writer whose id is still being looked up is left out: the token
        # then counts it at the minimum, which is true, only less precise.
        ahead = {
            self._ids[w]: pos
            for w, pos in self.positions().items()
            if pos > minimum and w in self._ids
        }
        return format_token(minimum, ahead)

    async def set_writers(self, writers: Sequence[str]) -> None:
        """Change the writer pool; the minimum never goes back."""
        async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
            ids = await ensure_instance_ids(conn, writers)
        self._ids.update(ids)
        self._writers = list(writers)
        self.state.set_writers(writers)
        self._notify()

    async def wait_for(self, position: int, timeout: float) -> bool:
        """Wait until the stream is complete up to `position`; False on timeout."""
        try:
            return await asyncio.wait_for(
                self._wait_until(lambda: self.complete_up_to() >= position), timeout
            )
        except TimeoutError:
            return self.complete_up_to() >= position

    async def rows(self) -> AsyncGenerator[EventRow, None]:
        """Every event row after the start, once each, in stream order, up to
        complete_up_to. One consumer at a time; it ends when the reader closes.
        Breaking out and calling again resumes after the last row received.
        With catch-up over HTTP, a persister refusing the call (a wrong
        secret, no such API) raises `CatchUpRejected` from here."""
        if self._consuming:
            raise RuntimeError("rows() is already being iterated")
        self._consuming = True
        try:
            while await self._wait_until(self.state.has_deliverable):
                span = self.state.db_range()
                if span is None:
                    row = self.state.next_buffered_row()
                    if row is not None:
                        yield row
                    continue
                rows, upto = await self._read_span(*span)
                for row in rows:
                    # Marked before it goes out: the consumer has it even if
                    # it stops iterating right here.
                    self.state.mark_delivered(row.stream_ordering)
                    yield row
                self.state.mark_delivered(upto)
        except ReaderClosed:
            return
        finally:
            self._consuming = False

    async def _read_span(
        self, from_exclusive: int, to_inclusive: int
    ) -> tuple[list[EventRow], int]:
        if self._catch_up is not None:
            rows, upto = await self._over_http(self._catch_up, from_exclusive, to_inclusive)
            self.catch_up_reads += 1
            return rows, upto
        rows, limited = await self._with_database(
            lambda conn: rows_between(conn, from_exclusive, to_inclusive, ROWS_PER_QUERY)
        )
        self.database_reads += 1
        return rows, rows[-1].stream_ordering if limited else to_inclusive

    async def _with_database(self, action: Callable[[AsyncConnection[Any]], Awaitable[_T]]) -> _T:
        """Run `action` on the reader's connection, reconnecting until it works:
        a consumer waits out a database outage instead of failing."""
        delay = RETRY_INITIAL_S
        while True:
            if self._closed:
                raise ReaderClosed
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await AsyncConnection.connect(self._database_url, autocommit=True)
                return await action(self._conn)
            except psycopg.OperationalError as exc:
                logger.warning("stream reader: database unavailable (%s); retrying", exc)
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _over_http(
        self, catch_up: CatchUpClient, from_exclusive: int, to_inclusive: int
    ) -> tuple[list[EventRow], int]:
        """One stretch from the catch-up API, retrying (on the next persister)
        until one answers: like `_with_database`, a consumer waits out outages."""
        delay = RETRY_INITIAL_S
        while True:
            if self._closed:
                raise ReaderClosed
            try:
                return await catch_up.rows_between(from_exclusive, to_inclusive, ROWS_PER_QUERY)
            except CatchUpUnavailable as exc:
                logger.warning("stream reader: catch-up API unavailable (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _wait_until(self, predicate: Callable[[], bool]) -> bool:
        """Wait for predicate(); False if the reader closed first."""
        while not predicate():
            if self._closed:
                return False
            await self._changed.wait()
        return True

    def _notify(self) -> None:
        # Wake every waiter once, and give later waiters a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
            self._conn = None

    # -- Redis ---------------------------------------------------------------

    async def _listen_forever(self) -> None:
        delay = RETRY_INITIAL_S
        while not self._closed:
            try:
                await self._listen_once()
            except (RedisError, OSError, TimeoutError) as exc:
                self._subscribed.clear()
                if not self._redis_failing:
                    logger.warning("stream reader: Redis subscription lost (%s); reconnecting", exc)
                self._redis_failing = True
            if self._subscribed.is_set():
                delay = RETRY_INITIAL_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _listen_once(self) -> None:
        client = redis_client(self._redis_url, f"persister-reader.{self._channel}", reconnects=0)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            await self._pump(pubsub)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _pump(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_heard = last_ping = loop.time()
        # Not `while True`: a cancellation that redis-py turns into a read
        # timeout would keep this loop, hence close(), going for ever.
        while not self._closed:
            message = await pubsub.get_message(timeout=PING_INTERVAL_S)
            now = loop.time()
            if message is not None:
                last_heard = now
                self._on_pubsub_message(message)
            elif now - last_heard > SILENCE_LIMIT_S:
                raise TimeoutError(f"nothing from Redis for {SILENCE_LIMIT_S} s")
            if now - last_ping >= PING_INTERVAL_S:
                await pubsub.ping()
                last_ping = now

    def _on_pubsub_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._on_subscribed()
        elif kind == "message":
            self._on_data(message["data"])

    def _on_subscribed(self) -> None:
        self.subscriptions += 1
        if self._redis_failing:
            logger.info("stream reader: subscribed again; catching up from the database")
        self._redis_failing = False
        self._subscribed.set()
        # Whatever was published while we were away is lost; the stored
        # positions (and map) tell us how far to read from the database
        # right away. Before the state exists, start() reads them anyway.
        if self._state is not None:
            self._start_refresh()

    def _start_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_from_database())

    def _on_data(self, data: bytes) -> None:
        if self._state is None:
            if len(self._early) < MAX_EARLY_MESSAGES:
                self._early.append(data)
            else:
                self._early_overflowed = True
            return
        try:
            command = decode_command(data)
        except msgspec.DecodeError as exc:
            # A lost message: the next one from that writer shows the gap.
            logger.warning("stream reader: ignoring a malformed message: %s", exc)
            return
        if command is None:
            announced = decode_announcement(data) if self._follow_map else None
            if announced is not None:
                self._on_announced_map(announced)
        elif self.state.apply(command):
            self._notify()

    def _on_announced_map(self, announced: ShardMapAnnouncement) -> None:
        # Applied at once, in channel order: see persister.replication.shardmap.
        if announced.epoch <= self._map_epoch:
            return
        shard_map = announced.shard_map()
        if announced.in_force:
            self._apply_in_force(shard_map)
        else:
            self._apply_prepared(shard_map)

    def _apply_stored_maps(self, in_force: ShardMap | None, draining: ShardMap | None) -> bool:
        changed = False
        if in_force is not None and in_force.epoch > self._map_epoch:
            changed = self._apply_in_force(in_force)
        if draining is not None:
            changed = self._apply_prepared(draining) or changed
        return changed

    def _apply_in_force(self, shard_map: ShardMap) -> bool:
        self._map_epoch = max(self._map_epoch, shard_map.epoch)
        changed = self._apply_map(shard_map, in_force=True)
        if self._prepared is not None and self._prepared.epoch > shard_map.epoch:
            # A newer map was announced (or is being drained): its writers
            # are not leaving, whatever this older one says.
            changed = self._apply_map(self._prepared, in_force=False) or changed
        return changed

    def _apply_prepared(self, shard_map: ShardMap) -> bool:
        self._prepared_epoch = max(self._prepared_epoch, shard_map.epoch)
        if self._prepared is None or shard_map.epoch >= self._prepared.epoch:
            self._prepared = shard_map
        return self._apply_map(shard_map, in_force=False)

    def _apply_map(self, shard_map: ShardMap, *, in_force: bool) -> bool:
        state = self.state
        changed = state.apply_shard_map(
            shard_map.all_writers(), shard_map.sequence_at_start or 0, in_force=in_force
        )
        self._writers = sorted(state.writers)
        new = [w for w in self._writers if w not in self._ids]
        if new:
            self._spawn(self._learn_ids(new))
        if changed:
            self._notify()
        return changed

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _learn_ids(self, writers: list[str]) -> None:
        try:
            async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
                self._ids.update(await ensure_instance_ids(conn, writers))
        except psycopg.Error as exc:
            logger.warning("stream reader: cannot look up writer ids: %s", exc)

    async def _poll_map_forever(self) -> None:
        """The stored map, and the stored positions of leaving writers, every
        `shard_map_poll_s`: for SHARDMAP messages that were lost."""
        while True:
            await asyncio.sleep(self._map_poll_s)
            try:
                if self._map_conn is None or self._map_conn.closed:
                    self._map_conn = await AsyncConnection.connect(
                        self._database_url, autocommit=True
                    )
                await self._poll_map_once(self._map_conn)
            except psycopg.Error as exc:
                logger.warning("stream reader: cannot poll the shard map: %s", exc)
                with contextlib.suppress(psycopg.Error, OSError):
                    if self._map_conn is not None:
                        await self._map_conn.close()
                self._map_conn = None

    async def _poll_map_once(self, conn: AsyncConnection[Any]) -> None:
        prepared_before = self._prepared_epoch
        # Fenced: an install whose early SHARDMAP was applied before this
        # read has committed or rolled back by the time it returns.
        current, draining = await load_maps_fenced(conn)
        if current is None:
            return
        newest = draining or current
        if prepared_before > newest.epoch:
            # That install rolled back: the writers only it named leave.
            self._prepared = draining
            self._apply_in_force(current)
        self._apply_stored_maps(current, draining)
        if not self.state.leaving():
            return
        stored = await read_stream_positions(conn)
        pending = await leaving_writers(conn, current)
        if self._prepared_epoch != prepared_before or self._map_epoch != current.epoch:
            return  # a map came meanwhile; the next round looks again
        changed = False
        for writer in self.state.leaving():
            # A stored position is a promise too (stored by the peer that
            # announced for a dead writer, say).
            if writer in stored:
                changed = self.state.apply_stored_position(writer, stored[writer]) or changed
            if writer not in pending:
                # No stored epoch left it anything unannounced: named only by
                # an install that rolled back, or announced past its start.
                changed = self.state.drop_leaving(writer) or changed
        if changed:
            self._writers = sorted(self.state.writers)
            self._notify()

    async def _refresh_from_database(self) -> None:
        # Positions first, then the map. A stored position covering a new
        # writer's event was stored after that writer's epoch took force, so
        # the map read later names it. And the read waits out an install
        # under way, whose early SHARDMAP we may have missed while away.
        try:
            async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
                stored = await read_stream_positions(conn)
                in_force, draining = (
                    await load_maps_fenced(conn) if self._follow_map else (None, None)
                )
        except psycopg.Error as exc:
            logger.warning("stream reader: cannot read stored positions: %s", exc)
            return
        changed = self._apply_stored_maps(in_force, draining)
        for instance, position in stored.items():
            if instance in self.state.writers or self.state.known(instance) is not None:
                changed = self.state.apply_stored_position(instance, position) or changed
        if changed:
            self._notify()
