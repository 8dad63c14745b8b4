"""Announce one writer's rows and positions on Redis (contract section 6).

The write path never waits for Redis. `publish_batch` and `publish_position`
only update in-memory state and wake one sender task, which turns that state
into messages and publishes them one at a time, in order. So:

- a slow or dead Redis never blocks persisting, and nothing here raises into
  the caller because of Redis;
- when Redis comes back, the sender publishes the *current* state, with
  `prev` = the last position Redis accepted, so a reader either continues
  its chain or sees the gap and reads it from the database;
- announced positions never decrease.

Rows are held back until the position passes them. A batch can commit above
an older batch that is still open (concurrent lanes); its rows wait until
the older one ends. That keeps the message promise of `messages.py`: an
RDATA carries *all* of this writer's rows in (prev, pos], nothing else.

For that promise the caller must hand over a batch's rows no later than any
position that covers them: call `WriterPositions.finish(...)` and then
`publish_batch(rows, positions.position())` with no `await` in between
(`publish_batch` takes everything it needs before its first suspension).

A publisher can also relay messages prepared for another instance: that is
how a live writer announces for a dead one (`persister.liveness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Final, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sortedcontainers import SortedDict  # type: ignore[import-untyped, unused-ignore]

from persister.replication.messages import (
    Command,
    EventRow,
    encode_command,
    position_command,
    rdata_command,
)

logger = logging.getLogger(__name__)

# Redis accepts far bigger messages, but one huge RDATA stalls every reader
# while it decodes; a position inside the batch is just as true a promise.
MAX_ROWS_PER_MESSAGE: Final = 500
# Rows waiting while Redis is down. Past this they are dropped and the next
# message says prev == pos, which sends readers to the database instead.
MAX_PENDING_ROWS: Final = 50_000
# Relayed announcements waiting while Redis is down; newer ones supersede.
MAX_PENDING_RELAYS: Final = 1_000
RETRY_INITIAL_S: Final = 0.05
RETRY_MAX_S: Final = 1.0
# The contract wants an idle writer heard at least once a second. A tick
# announces only once its database read is back, so ticks a second apart
# left gaps of a second and that read (up to 1.36 s measured): half a second
# keeps every gap under one with room for a slow read.
HEARTBEAT_S: Final = 0.5


class _SortedRows(Protocol):
    """The part of SortedDict[int, EventRow] used here."""

    def __setitem__(self, key: int, value: EventRow) -> None: ...
    def __len__(self) -> int: ...
    def irange(self, minimum: int | None = None, maximum: int | None = None) -> Iterator[int]: ...
    def peekitem(self, index: int = -1) -> tuple[int, EventRow]: ...
    def popitem(self, index: int = -1) -> tuple[int, EventRow]: ...
    def clear(self) -> None: ...
    def __getitem__(self, key: int) -> EventRow: ...


def hints_channel(channel: str) -> str:
    """Where writers tell each other what readers need not hear (a DRAWN,
    `persister.replication.peers`): beside `channel`, which carries only
    what contract section 6 defines, so that readers are not woken for it."""
    return f"{channel}.hints"


def redis_client(url: str, name: str | None = None, *, reconnects: int = 1) -> Redis:
    """A client that fails fast: our loops do the retrying, with our backoff.

    One immediate reconnect lets a publish survive a killed socket; the
    subscriber passes 0 so that it sees, and handles, every disconnect.
    `name`, if given, shows in CLIENT LIST (no spaces).
    """
    client: Redis = Redis.from_url(
        url,
        client_name=name,
        retry=Retry(NoBackoff(), reconnects),
        socket_connect_timeout=2.0,
        socket_timeout=2.0,
    )
    return client


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled while redis-py had it.

    redis-py can swallow a cancellation that lands in one of its read
    timeouts (redis/redis-py#2028, #2551): the call returns as if nothing
    had happened, and a loop around it would go on, holding a writer's
    shutdown for as long as the step's bound (10 s; seen in about one run of
    two of tests/integration/test_catch_up.py). The request stays counted on
    the task, so our Redis loops call this whenever redis-py returns.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling() > 0:
        raise asyncio.CancelledError


class Outbox:
    """What one writer still has to announce, as a pure state machine.

    `Publisher` feeds it from the write path and drains it to Redis; tests
    drive it directly. `next_command` builds the next message without
    changing anything; `mark_sent` records that Redis accepted it.
    """

    def __init__(self, instance: str, *, max_pending_rows: int = MAX_PENDING_ROWS) -> None:
        self.instance = instance
        self._max_pending_rows = max_pending_rows
        self._pending: _SortedRows = SortedDict()
        self._relays: deque[Command] = deque(maxlen=MAX_PENDING_RELAYS)
        self.target: int | None = None  # the newest position asked for
        self._first: int | None = None  # the first one: where our chain starts
        self.announced: int | None = None  # the newest position Redis accepted
        self._force = False  # a heartbeat wants a message even if nothing changed
        self._lost_upto: int | None = None  # rows up to here were dropped unsent

    def add_rows(self, rows: Sequence[EventRow]) -> None:
        for row in rows:
            if self.announced is not None and row.stream_ordering <= self.announced:
                # The caller announced a position covering this row before
                # handing it over; readers in sync have passed it already.
                logger.error(
                    "publisher %s: row %d arrived after position %d was announced",
                    self.instance,
                    row.stream_ordering,
                    self.announced,
                )
                continue
            self._pending[row.stream_ordering] = row
        if len(self._pending) > self._max_pending_rows:
            self._drop_pending_rows()

    def request(self, position: int, *, force: bool) -> None:
        # A lower position than one asked for before comes from a caller that
        # computed it earlier and ran later; the newer promise covers it.
        if self.target is None:
            self._first = position
        if self.target is None or position > self.target:
            self.target = position
        self._force = self._force or force

    def relay(self, command: Command) -> None:
        self._relays.append(command)

    def has_work(self) -> bool:
        if self._relays:
            return True
        if self.target is None:
            return False
        return self._force or self.announced is None or self.target > self.announced

    def next_command(self) -> Command:
        """The next message to publish; call only when `has_work()`."""
        if self._relays:
            return self._relays[0]
        assert self.target is not None and self._first is not None
        pos, prev = self.target, self.announced
        if prev is None:
            # Our first message starts the chain at the first position asked
            # for (the writer's start, if it announces that before writing),
            # making no claim about rows before it.
            return position_command(self.instance, self._first, self._first)
        if self._lost_upto is not None and self._lost_upto > prev:
            # Rows were dropped: no claim about earlier rows; readers that are
            # behind read the database.
            return position_command(self.instance, pos, pos)
        orderings = list(self._pending.irange(minimum=prev + 1, maximum=pos))
        if not orderings:
            return position_command(self.instance, prev, pos)
        if len(orderings) > MAX_ROWS_PER_MESSAGE:
            orderings = orderings[:MAX_ROWS_PER_MESSAGE]
            pos = orderings[-1]  # still a true promise: it is below the target
        rows = tuple(self._pending[ordering] for ordering in orderings)
        return rdata_command(self.instance, prev, pos, rows)

    def mark_sent(self, command: Command) -> None:
        if command.instance != self.instance:
            # A relay. It may have been pushed out of a full queue meanwhile.
            if self._relays and self._relays[0] is command:
                self._relays.popleft()
            return
        pos = command.pos
        self.announced = pos
        while len(self._pending) and self._pending.peekitem(0)[0] <= pos:
            self._pending.popitem(0)
        if self._lost_upto is not None and pos >= self._lost_upto:
            self._lost_upto = None
        if pos == self.target:
            self._force = False

    def pending_rows(self) -> int:
        return len(self._pending)

    def _drop_pending_rows(self) -> None:
        highest, _ = self._pending.peekitem(-1)
        logger.warning(
            "publisher %s: dropping %d unsent rows up to %d; readers will read them "
            "from the database",
            self.instance,
            len(self._pending),
            highest,
        )
        self._pending.clear()
        self._lost_upto = max(highest, self._lost_upto or highest)


class Publisher:
    def __init__(self, redis_url: str, channel: str, instance: str) -> None:
        self.instance = instance
        self._redis_url = redis_url
        self._channel = channel
        self._client: Redis | None = None
        self._outbox = Outbox(instance)
        self._hint: bytes | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._failing = False
        self._heartbeat_failing = False

    async def start(self) -> None:
        """Never fails because Redis is down: the sender keeps trying."""
        self._client = redis_client(self._redis_url, f"persister-publisher.{self.instance}")
        self._sender = asyncio.create_task(self._send_forever(), name=f"publisher:{self.instance}")

    async def close(self, flush_timeout_s: float = 1.0) -> None:
        await _cancel(self._heartbeat)
        self._heartbeat = None
        await self.flush(flush_timeout_s)
        await _cancel(self._sender)
        self._sender = None
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
            self._client = None

    async def publish_batch(self, rows: Sequence[EventRow], position: int) -> None:
        """Rows of a committed batch, and this writer's position after it."""
        self._outbox.add_rows(rows)
        self._outbox.request(position, force=False)
        self._wake()

    def announce(self, position: int) -> None:
        """This writer's position rose to `position`: announce it if no message
        carries it yet. Synchronous, for `WriterPositions(on_advance=...)`: it
        may run inside `finish()`, before that batch's rows are handed over,
        which is safe because messages are built only when the sender runs,
        after the caller's next suspension, by which time the rows are here."""
        self._outbox.request(position, force=False)
        self._wake()

    def hint(self, message: bytes) -> None:
        """Publish `message` on the hints channel once the announcements
        queued now are out, replacing a hint not sent yet: for facts of
        which only the newest matters (a DRAWN, see
        `persister.replication.peers`). Not a promise, so never retried."""
        self._hint = message
        self._wake()

    async def publish_position(self, position: int) -> None:
        """Announce `position` even if it was announced before (a heartbeat)."""
        self._outbox.request(position, force=True)
        self._wake()

    async def relay(self, command: Command) -> None:
        """Publish a message prepared for another instance, in order with ours."""
        self._outbox.relay(command)
        self._wake()

    def start_heartbeat(
        self, get_position: Callable[[], Awaitable[int]], interval_s: float = HEARTBEAT_S
    ) -> None:
        """Announce about every `interval_s`, writes or not."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(
                self._heartbeat_forever(get_position, interval_s),
                name=f"heartbeat:{self.instance}",
            )

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything asked for is on Redis; False on timeout."""
        if not self._outbox.has_work():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def announced(self) -> int | None:
        """The newest own position Redis accepted."""
        return self._outbox.announced

    def _wake(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    async def _send_forever(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            if self._hint is None and not self._outbox.has_work():
                self._idle.set()
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                # Our own announcements first: readers wait on those.
                if self._outbox.has_work():
                    await self._send_next()
                else:
                    await self._send_hint()
            except (RedisError, OSError) as exc:
                raise_if_cancelled()
                self._note_failure(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                raise_if_cancelled()
                self._note_success()
                delay = RETRY_INITIAL_S

    async def _send_hint(self) -> None:
        assert self._client is not None and self._hint is not None
        message, self._hint = self._hint, None
        await self._client.publish(hints_channel(self._channel), message)

    async def _send_next(self) -> None:
        assert self._client is not None
        command = self._outbox.next_command()
        await self._client.publish(self._channel, encode_command(command))
        self._outbox.mark_sent(command)

    def _note_failure(self, exc: BaseException) -> None:
        if not self._failing:
            logger.warning(
                "publisher %s: cannot publish to Redis (%s); will retry", self.instance, exc
            )
        self._failing = True

    def _note_success(self) -> None:
        if self._failing:
            logger.info(
                "publisher %s: Redis is back; announced %s", self.instance, self._outbox.announced
            )
        self._failing = False

    async def _heartbeat_forever(
        self, get_position: Callable[[], Awaitable[int]], interval_s: float
    ) -> None:
        # The position source reads the database, which may be slow or down.
        # Ticks never wait for it: while a read is still running, a tick
        # repeats the last promise, which is still true.
        refresh: asyncio.Task[None] | None = None
        try:
            while True:
                if refresh is None or refresh.done():
                    refresh = asyncio.create_task(self._refresh(get_position))
                elif self._outbox.target is not None:
                    self._outbox.request(self._outbox.target, force=True)
                    self._wake()
                await asyncio.sleep(interval_s)
        finally:
            await _cancel(refresh)

    async def _refresh(self, get_position: Callable[[], Awaitable[int]]) -> None:
        try:
            position = await get_position()
        except Exception:  # the heartbeat must outlive any failure of its source
            if not self._heartbeat_failing:
                logger.warning(
                    "publisher %s: heartbeat cannot read the position; repeating the last one",
                    self.instance,
                    exc_info=True,
                )
            self._heartbeat_failing = True
            if self._outbox.target is not None:
                await self.publish_position(self._outbox.target)
            return
        self._heartbeat_failing = False
        await self.publish_position(position)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
