"""What a fault test watches while the persisters run.

- `ChannelRecorder`: a plain Redis subscriber that keeps every POSITION and
  RDATA with the wall-clock time it arrived. It resubscribes after a Redis
  outage (what it misses then is simply not checked).
- `ReaderWatch`: a `persister.replication.reader.StreamReader` as a
  downstream worker embeds it, consuming `rows()`, plus every `sample_s` a
  sample (complete_up_to C, events committed with 0 < ordering <= C). The
  promise says that count can never grow later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from persister.replication.messages import Command, EventRow, decode_command
from persister.replication.reader import StreamReader

COUNT_UPTO = "SELECT count(*) FROM events WHERE stream_ordering > 0 AND stream_ordering <= %s"
# Watchers run until their test closes them; this bounds them if it never does.
WATCH_LIMIT_S = 3600.0


def watching(started: float) -> bool:
    return time.monotonic() - started < WATCH_LIMIT_S


@dataclass(frozen=True)
class Heard:
    at: float  # wall clock, when it arrived
    command: Command


class ChannelRecorder:
    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.heard: list[Heard] = []
        self.subscriptions = 0
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._subscribed.wait(), timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        started = time.monotonic()
        while watching(started):  # or until cancelled
            client = Redis.from_url(self.redis_url, socket_connect_timeout=1)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(self.channel)
                await self._pump(pubsub)
            except (RedisError, OSError):
                self._subscribed.clear()
                await asyncio.sleep(0.05)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    async def _pump(self, pubsub: Any) -> None:
        started = time.monotonic()
        while watching(started):
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            if message["type"] == "subscribe":
                self.subscriptions += 1
                self._subscribed.set()
            elif message["type"] == "message":
                at = time.time()
                command = decode_command(message["data"])
                if command is not None:
                    self.heard.append(Heard(at, command))

    def of(self, instance: str) -> list[Heard]:
        return [h for h in self.heard if h.command.instance == instance]


@dataclass
class Sample:
    at: float
    complete_up_to: int
    committed_upto: int  # events committed with 0 < ordering <= complete_up_to, then


@dataclass
class ReaderWatch:
    reader: StreamReader
    database_url: str
    sample_s: float = 0.1
    rows: list[EventRow] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.reader.start()
        self._tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._sample())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.reader.close()

    async def caught_up(self, position: int, timeout_s: float) -> bool:
        """Whether the reader, within `timeout_s`, is complete up to `position`
        and has handed out every row up to there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (
                self.reader.complete_up_to() >= position
                and self.reader.state.delivered() >= position
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _consume(self) -> None:
        async with contextlib.aclosing(self.reader.rows()) as rows:
            async for row in rows:
                self.rows.append(row)

    async def _sample(self) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            started = time.monotonic()
            while watching(started):  # or until cancelled
                await asyncio.sleep(self.sample_s)
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(
                            self.database_url, autocommit=True, connect_timeout=2
                        )
                    upto = self.reader.complete_up_to()
                    cur = await conn.execute(COUNT_UPTO, (upto,))
                    row = await cur.fetchone()
                    assert row is not None
                    self.samples.append(Sample(time.time(), upto, int(row[0])))
                except psycopg.OperationalError:
                    conn = None  # the database is away: no sample this time
        finally:
            if conn is not None:
                await conn.close()
