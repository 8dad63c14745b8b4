"""Test helpers for runs against real `persister run` processes.

- `PrivateRedis`: a redis-server of the test's own, which it may stop and
  start again (the shared Redis must never be restarted).
- `running_pool`: a throw-away pool started the way the load harness starts
  one (`persister.bench.pool`): fresh database, one process per instance.
- `RoomLoad`: concurrent event creators going through `persister.client`.
- `PromiseLog`: what was committed when a position was announced, so that a
  later recount shows whether anything at or below it committed afterwards.
- `Announcements` and `ReaderRun`: the positions on the channel and what a
  `StreamReader` delivered.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from persister.bench import databases
from persister.bench.pool import BenchPool, PoolSettings, free_port, start_pool
from persister.client import ClientOptions, PersisterClient
from persister.errors import PersisterError
from persister.replication.messages import decode_command
from persister.replication.reader import StreamReader
from persister.sharding import sha256_owner
from tests.fixtures.persister import RoomBuilder

# -- a Redis of our own ------------------------------------------------------------


class PrivateRedis:
    """`redis-server --port <free> --save '' --appendonly no`, ours to stop and start."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self._binary = binary
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout_s: float = 10.0) -> None:
        command = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while not await self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not come up")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Like a crash for its clients: every connection drops, every message is gone."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # our own child, by its pid
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 5)

    async def _answers(self) -> bool:
        client = Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()


# -- a pool of real persisters -------------------------------------------------------


@contextlib.asynccontextmanager
async def running_pool(
    database_server_url: str, redis_url: str, instances: int, folder: Path
) -> AsyncIterator[BenchPool]:
    """Started like the load harness's pool; stopped (SIGTERM) and its database
    dropped afterwards. `exit_codes` is filled in on the way out."""
    pool = await start_pool(PoolSettings(database_server_url, redis_url, instances, folder))
    try:
        yield pool
    finally:
        await pool.stop()
        await databases.drop_database(database_server_url, pool.database_name)


def database_url(pool: BenchPool) -> str:
    return pool.config.database.url


def base_urls(pool: BenchPool) -> list[str]:
    return [
        f"http://{loc.host}:{loc.port}/"
        for name, loc in pool.config.instance_map.items()
        if name in pool.config.stream_writers.events
    ]


def reader_for(pool: BenchPool, redis_url: str, **options: Any) -> StreamReader:
    return StreamReader(
        redis_url,
        pool.config.redis.channel,
        database_url(pool),
        pool.config.stream_writers.events,
        **options,
    )


# -- load ----------------------------------------------------------------------------


def rooms_owned_by(writers: list[str], per_writer: int) -> dict[str, list[str]]:
    """Room IDs, `per_writer` of them placed on each writer (contract section 2)."""
    salt = secrets.token_hex(4)
    rooms: dict[str, list[str]] = {w: [] for w in writers}
    for i in range(per_writer * len(writers) * 20):
        room_id = f"!load{i}-{salt}:example.org"
        owned = rooms[sha256_owner(room_id, writers)]
        if len(owned) < per_writer:
            owned.append(room_id)
        if all(len(r) == per_writer for r in rooms.values()):
            return rooms
    raise AssertionError("sha256 placement left a writer without rooms")


@dataclass
class Ack:
    instance: str
    highest: int  # highest stream ordering of the request
    at: float  # monotonic time the answer arrived


@dataclass
class RoomLoad:
    """One event creator per room, each sending its room's history in requests of
    1-`max_batch` events, one request at a time, until `stop()`."""

    client: PersisterClient
    room_ids: list[str]
    max_batch: int = 8
    acks: list[Ack] = field(default_factory=list)
    failed_rooms: dict[str, str] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        for index, room_id in enumerate(self.room_ids):
            self._tasks.append(asyncio.create_task(self._drive(room_id, random.Random(index))))

    async def stop(self) -> None:
        """Let every in-flight request finish, send nothing more."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def acked_on(self, instance: str) -> list[Ack]:
        return [ack for ack in self.acks if ack.instance == instance]

    async def _drive(self, room_id: str, rng: random.Random) -> None:
        room = RoomBuilder(room_id=room_id)
        while not self._stop.is_set():
            pdus = [{"pdu": room.event()[1]} for _ in range(rng.randint(1, self.max_batch))]
            try:
                answer = await self.client.persist(room_id, room.room_version, pdus)
            except PersisterError as exc:
                # The room's owner is gone (a test killed it): stop this room.
                self.failed_rooms[room_id] = str(exc)
                return
            highest = max(result.stream_ordering for result in answer.results)
            self.acks.append(Ack(answer.position.instance, highest, time.monotonic()))


def client_for(pool: BenchPool, *, deadline_s: float = 30.0) -> PersisterClient:
    return PersisterClient.from_config(
        pool.config, options=ClientOptions(deadline_s=deadline_s, request_timeout_s=5.0)
    )


# -- promises and their recount ---------------------------------------------------------

ALL_WRITERS = ""  # the stream as a whole: what a reader's complete position vouches for

COUNT_NEW = """
    SELECT u.who, u.hi, (
        SELECT count(*) FROM events e
        WHERE e.stream_ordering > u.lo AND e.stream_ordering <= u.hi
          AND (u.who = '' OR e.instance_name = u.who))
    FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS u(who, lo, hi)
"""


@dataclass(frozen=True)
class Promise:
    who: str  # a writer, or ALL_WRITERS
    position: int
    committed: int  # events of `who` with 0 < stream_ordering <= position, when noted
    at: float


class PromiseLog:
    """Notes, right after a position is announced (or a reader's complete
    position changes), how many of the events it covers are committed.

    Counting all of them every time would scan the table; instead each note
    counts only the stretch above the previous note of the same `who`, and
    adds the previous count. If every earlier promise held, that sum is the
    count at this moment; if one did not, the recount catches that one. So
    a later recount larger than a noted count means an event at or below
    the position committed after the note, i.e. after the announcement.

    Announcements that arrive together are noted together with the highest
    position per `who`: an event committing late below a lower one of them
    is below the highest one too, and the note is taken at the same moment.
    """

    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()
        self._last: dict[str, tuple[int, int]] = {}  # who -> (position, committed)
        self.promises: list[Promise] = []

    async def note(self, positions: dict[str, int]) -> None:
        async with self._lock:
            fresh = {
                who: pos for who, pos in positions.items() if pos > self._last.get(who, (0, 0))[0]
            }
            if not fresh:
                return
            whos = sorted(fresh)
            lows = [self._last.get(who, (0, 0))[0] for who in whos]
            highs = [fresh[who] for who in whos]
            cur = await self._conn.execute(COUNT_NEW, (whos, lows, highs))
            at = time.monotonic()
            for who, high, new in await cur.fetchall():
                before = self._last.get(who, (0, 0))[1]
                self._last[who] = (high, before + new)
                self.promises.append(Promise(who, high, before + new, at))


class Recount:
    """The committed events as they are now, for recounting noted promises."""

    def __init__(self, rows: Iterable[tuple[int, str]]) -> None:
        self._all: list[int] = []
        self._by_writer: dict[str, list[int]] = {}
        for ordering, instance in rows:
            if ordering > 0:
                self._all.append(ordering)
                self._by_writer.setdefault(instance, []).append(ordering)
        self._all.sort()
        for orderings in self._by_writer.values():
            orderings.sort()

    @classmethod
    async def read(cls, conn: AsyncConnection[Any]) -> Recount:
        cur = await conn.execute("SELECT stream_ordering, instance_name FROM events")
        return cls(await cur.fetchall())

    def committed(self, who: str, position: int) -> int:
        orderings = self._all if who == ALL_WRITERS else self._by_writer.get(who, [])
        return bisect.bisect_right(orderings, position)

    def broken(self, promises: Iterable[Promise]) -> list[tuple[Promise, int]]:
        """Promises whose count grew after they were noted, with the count now."""
        out = []
        for promise in promises:
            now = self.committed(promise.who, promise.position)
            if now != promise.committed:
                out.append((promise, now))
        return out

    def forward_orderings(self) -> list[int]:
        return list(self._all)


# -- following the channel and a reader ----------------------------------------------------


class Announcements:
    """Every position announced on the channel, noted in a PromiseLog as it
    arrives; resubscribes after a Redis restart."""

    def __init__(self, redis_url: str, channel: str, log: PromiseLog) -> None:
        self._redis_url = redis_url
        self._channel = channel
        self._log = log
        self._task: asyncio.Task[None] | None = None
        self.messages = 0
        self.heard: list[tuple[float, str, int]] = []  # (time, instance, pos) of every message

    async def start(self) -> None:
        subscribed = asyncio.Event()
        self._task = asyncio.create_task(self._run(subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, subscribed: asyncio.Event) -> None:
        while True:
            client = Redis.from_url(self._redis_url, socket_connect_timeout=1.0)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._channel)
                subscribed.set()
                await self._pump(pubsub)
            except (RedisError, OSError):
                await asyncio.sleep(0.05)  # Redis restarting: try again
            finally:
                await client.aclose()

    async def _pump(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            batch: dict[str, int] = {}
            # Whatever else has arrived meanwhile is noted in the same query.
            for _ in range(10_000):
                if message is None:
                    break
                self._take(message, batch)
                message = await pubsub.get_message(timeout=0)
            if batch:
                await self._log.note(batch)

    def _take(self, message: dict[str, Any], batch: dict[str, int]) -> None:
        command = decode_command(message["data"])
        if command is None:
            return
        self.messages += 1
        self.heard.append((time.monotonic(), command.instance, command.pos))
        batch[command.instance] = max(batch.get(command.instance, 0), command.pos)


@dataclass
class ReaderRun:
    """A started reader, its consumer (collecting delivered orderings) and a
    watcher noting every change of complete_up_to in a PromiseLog."""

    reader: StreamReader
    log: PromiseLog | None = None
    start: int = 0
    delivered: list[int] = field(default_factory=list)
    complete_at: list[tuple[float, int]] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def begin(self) -> None:
        await self.reader.start()
        self.start = self.reader.complete_up_to()
        self._tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._watch())]

    async def caught_up_with(self, orderings: list[int], timeout_s: float) -> bool:
        """Wait until complete_up_to covers, and the consumer has, every ordering."""
        target = max(orderings, default=self.start)
        deadline = time.monotonic() + timeout_s
        expected = sum(1 for o in orderings if o > self.start)
        while len(self.delivered) < expected or self.reader.complete_up_to() < target:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def end(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reader.close()

    async def _consume(self) -> None:
        async with contextlib.aclosing(self.reader.rows()) as rows:
            async for row in rows:
                self.delivered.append(row.stream_ordering)

    async def _watch(self) -> None:
        seen = self.reader.complete_up_to()
        while True:
            await self.reader.wait_for(seen + 1, timeout=1.0)
            now = self.reader.complete_up_to()
            if now > seen:
                seen = now
                self.complete_at.append((time.monotonic(), now))
                if self.log is not None:
                    await self.log.note({ALL_WRITERS: now})


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
