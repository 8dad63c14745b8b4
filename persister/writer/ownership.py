"""The shard map a persister routes by, kept fresh without a restart.

Freshness comes three ways: a poll every `poll_interval_s`, a refresh before
answering 421 (so two persisters never bounce a room between them while one
has not yet seen a new epoch), and the fence in every write transaction,
which is what makes it correct: a stale map can delay a room, never let two
owners commit it.

Loads share one autocommit connection, so a refresh on the way to a 421 (or
to rerouting a batch after an epoch change) costs one query, not a new
connection; that is most of the pause a moved room sees.

The poll also keeps `leaving`: writers the map in force removed whose last
orderings may still be unannounced. Live writers announce for them too if
they die (`Writer._announce_for_dead_writers`), or readers, which wait for
a removed writer to announce the new epoch's start, would wait forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from persister.sharding import Scheme, ShardMap
from persister.storage.shard_map import leaving_writers, load_or_seed, load_shard_map

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class LiveShardMap:
    def __init__(
        self,
        database_url: str,
        seed_writers: tuple[str, ...],
        sharding: Scheme,
        poll_interval_s: float = 1.0,
    ) -> None:
        self.database_url = database_url
        self.current = ShardMap(0, seed_writers, sharding)
        self.leaving: frozenset[str] = frozenset()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._seed = (seed_writers, sharding)
        self._poll_interval_s = poll_interval_s
        self._load_began_at = 0.0
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    def owner(self, room_id: str) -> str:
        return self.current.owner(room_id)

    @property
    def epoch(self) -> int:
        return self.current.epoch

    def watched_writers(self) -> set[str]:
        """Writers whose positions the pool must keep moving: those of the map
        in force and those still leaving it."""
        return self.current.all_writers() | self.leaving

    async def start(self) -> None:
        async with self._lock:
            conn = await self._connection()
            self._install(await load_or_seed(conn, *self._seed))
            self.leaving = frozenset(await leaving_writers(conn, self.current))
        self._poller = asyncio.create_task(self._poll_forever(), name="shard-map-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self._drop_connection()

    async def refresh(self) -> ShardMap:
        """The stored map as it is now, or as read by a load that began after this call.

        Concurrent callers share one load, so a burst of misdirected
        requests costs one query, yet nobody gets a map older than its call.
        """
        called_at = time.monotonic()
        async with self._lock:
            if self._load_began_at < called_at:
                began_at = time.monotonic()
                stored = await self._load(load_shard_map)
                if stored is not None:
                    self._install(stored)
                self._load_began_at = began_at
        return self.current

    async def _refresh_leaving(self) -> None:
        async with self._lock:
            current = self.current
            self.leaving = frozenset(await self._load(lambda c: leaving_writers(c, current)))

    async def _load(self, read: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]) -> _T:
        """`read` on the shared connection; once more on a new one if that
        connection had died since its last use (a database restart, say)."""
        try:
            return await read(await self._connection())
        except psycopg.OperationalError:
            await self._drop_connection()
        try:
            return await read(await self._connection())
        except psycopg.OperationalError:
            await self._drop_connection()
            raise

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True, application_name="persister:shard-map"
            )
        return self._conn

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
            self._conn = None

    def _install(self, shard_map: ShardMap) -> None:
        if shard_map.epoch < self.current.epoch:
            return  # epochs only grow; an older read lost a race
        if shard_map.epoch != self.current.epoch:
            logger.info(
                "shard map epoch %d in force: writers %s, %d pin(s)",
                shard_map.epoch,
                ",".join(shard_map.writers),
                len(shard_map.pins),
            )
        self.current = shard_map

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self.refresh()
                await self._refresh_leaving()
            except psycopg.Error as exc:
                logger.warning("cannot reload the shard map: %s", exc)
