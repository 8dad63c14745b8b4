"""Test helpers: a writer that drives positions, publisher and fence the way the
persister's write path must, minus HTTP and the room DAG; and a Redis proxy
that can play "Redis is down" without touching the shared server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from psycopg import AsyncConnection
from redis.asyncio import Redis

from persister.liveness import fence_check_txn
from persister.positions import WriterPositions
from persister.replication.messages import Command, EventRow, decode_command
from persister.replication.publisher import Publisher
from persister.replication.reader import StreamReader
from persister.storage.streams import (
    heartbeat_position,
    recover_position,
    upsert_stream_position_txn,
)

INSERT_EVENT = """
    INSERT INTO events (stream_ordering, topological_ordering, event_id, room_id, type,
                        state_key, sender, origin_server_ts, received_ts, outlier, instance_name)
    VALUES (%s, 1, %s, '!room:test', 'm.room.message', NULL, %s, 0, 0, false, %s)
"""


def event_row(ordering: int, instance: str) -> EventRow:
    return EventRow(
        ordering,
        f"${instance}-{ordering}",
        "!room:test",
        "m.room.message",
        None,
        f"@{instance}:test",
    )


async def connect(database_url: str) -> AsyncConnection[Any]:
    return await AsyncConnection.connect(database_url, autocommit=True)


async def draw(conn: AsyncConnection[Any], n: int) -> list[int]:
    cur = await conn.execute(
        "SELECT nextval('events_stream_seq') FROM generate_series(1, %s)", (n,)
    )
    return [int(o) for (o,) in await cur.fetchall()]


async def insert_events(
    conn: AsyncConnection[Any], instance: str, orderings: list[int]
) -> list[EventRow]:
    rows = [event_row(o, instance) for o in orderings]
    async with conn.cursor() as cur:
        await cur.executemany(
            INSERT_EVENT, [(r.stream_ordering, r.event_id, r.sender, instance) for r in rows]
        )
    return rows


class SimWriter:
    """One persister instance's stream bookkeeping over a real database."""

    def __init__(
        self,
        database_url: str,
        name: str,
        publisher: Publisher | None = None,
        *,
        epoch: int | None = None,
    ) -> None:
        self.database_url = database_url
        self.name = name
        self.publisher = publisher
        self.epoch = epoch
        self.positions = WriterPositions(name, 0)
        self.conn: AsyncConnection[Any] | None = None

    async def start(self) -> int:
        self.conn = await connect(self.database_url)
        start = await recover_position(self.conn, self.name)
        self.positions = WriterPositions(self.name, start)
        if self.publisher is not None:
            await self.publisher.publish_position(start)
        return start

    async def write(self, n: int = 1, *, commit: bool = True) -> list[EventRow]:
        """One write transaction of n events, then finish + publish as the lead does."""
        assert self.conn is not None
        orderings: list[int] = []
        rows: list[EventRow] = []
        try:
            async with self.conn.transaction(force_rollback=not commit):
                async with self.conn.cursor() as cur:
                    if self.epoch is not None:
                        await fence_check_txn(cur, self.name, self.epoch)
                    token = self.positions.begin_fetch()
                    try:
                        orderings = await draw(self.conn, n)
                    except BaseException:
                        self.positions.abandon_fetch(token)
                        raise
                    self.positions.end_fetch(token, orderings)
                    rows = await insert_events(self.conn, self.name, orderings)
                    await upsert_stream_position_txn(
                        cur, "events", self.name, self.positions.position_if_finished(orderings)
                    )
        finally:
            self.positions.finish(orderings)
        published = rows if commit else []
        if self.publisher is not None:  # no await between finish() and this call
            await self.publisher.publish_batch(published, self.positions.position())
        return published

    async def heartbeat(self) -> int:
        assert self.conn is not None
        position = await heartbeat_position(self.conn, self.positions, self.name)
        if self.publisher is not None:
            await self.publisher.publish_position(position)
        return position

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def collect(reader: StreamReader, count: int, timeout: float = 5.0) -> list[EventRow]:
    """The next `count` rows from reader.rows(), closing the iterator after."""
    out: list[EventRow] = []

    async def run() -> None:
        async with contextlib.aclosing(reader.rows()) as rows:
            async for row in rows:
                out.append(row)
                if len(out) >= count:
                    return

    if count:
        await asyncio.wait_for(run(), timeout)
    return out


async def eventually(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def until_subscribed(client: Redis, channel: str, timeout: float = 2.0) -> None:
    """Wait until someone subscribes to `channel` (a follower is listening)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        [(_, subscribers)] = await client.pubsub_numsub(channel)
        if int(subscribers) >= 1:
            return
        if loop.time() > deadline:
            raise AssertionError(f"nobody subscribed to {channel} in time")
        await asyncio.sleep(0.02)


class RedisProxy:
    """A TCP relay in front of Redis: `down()` drops every connection and
    refuses new ones, `up()` accepts again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def up(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers.update((client_w, server_w))
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class Listener:
    """A plain subscriber that records every command on the channel."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.client = Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub()
        self.channel = channel
        self.commands: list[tuple[float, Command]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.subscribe(self.channel)
        while (await self.pubsub.get_message(timeout=1.0)) is None:
            pass  # the subscribe confirmation: from now on nothing is missed
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                command = decode_command(message["data"])
                assert command is not None
                self.commands.append((time.monotonic(), command))

    def of(self, instance: str) -> list[Command]:
        return [c for _, c in self.commands if c.instance == instance]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pubsub.aclose()
        await self.client.aclose()
