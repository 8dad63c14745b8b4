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
nothing waits for them: keep the writer list complete (`set_writers`).
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

from persister.replication.messages import (
    EVENTS_STREAM,
    Command,
    EventRow,
    RData,
    decode_command,
)
from persister.replication.publisher import redis_client
from persister.storage.streams import (
    complete_position,
    ensure_instance_ids,
    read_stream_positions,
    rows_between,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ROWS_PER_QUERY: Final = 500
MAX_BUFFERED_ROWS: Final = 10_000
# Writers announce every second, so a silent subscription is a dead one
# (a half-open TCP connection never errors): ping, and reconnect if even
# the pong does not come.
PING_INTERVAL_S: Final = 1.0
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

    @property
    def writers(self) -> frozenset[str]:
        return self._writers

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
        self._recompute()

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
        self._recompute()
        return True

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
    ) -> None:
        """`from_position`: deliver rows after it (default: where the stream is
        complete now, from the database). `subscribe_timeout_s`: how long
        `start` waits for Redis before failing (None: do not wait)."""
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

    async def start(self) -> None:
        async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
            self._ids = await ensure_instance_ids(conn, self._writers)
            start = self._from_position
            if start is None:
                start = await complete_position(conn, self._writers)
        self._state = StreamState(self._writers, start, max_buffered_rows=self._max_buffered)
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

    async def close(self) -> None:
        self._closed = True
        self._notify()
        for task in (self._listener, self._refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._listener = self._refresh = None
        await self._drop_connection()

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
        ahead = {self._ids[w]: pos for w, pos in self.positions().items() if pos > minimum}
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
        Breaking out and calling again resumes after the last row received."""
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
        while True:
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
        # positions tell us how far to read from the database right away.
        # (The first time, start() has just read them.)
        if self.subscriptions > 1 and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._refresh_from_database())

    def _on_data(self, data: bytes) -> None:
        try:
            command = decode_command(data)
        except msgspec.DecodeError as exc:
            # A lost message: the next one from that writer shows the gap.
            logger.warning("stream reader: ignoring a malformed message: %s", exc)
            return
        if command is not None and self.state.apply(command):
            self._notify()

    async def _refresh_from_database(self) -> None:
        try:
            async with await AsyncConnection.connect(self._database_url, autocommit=True) as conn:
                stored = await read_stream_positions(conn)
        except psycopg.Error as exc:
            logger.warning("stream reader: cannot read stored positions: %s", exc)
            return
        changed = False
        for instance, position in stored.items():
            if instance in self.state.writers or self.state.known(instance) is not None:
                changed = self.state.apply_stored_position(instance, position) or changed
        if changed:
            self._notify()
