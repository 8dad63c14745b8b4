"""The shard map a persister routes by, kept fresh without a restart.

Freshness comes four ways: a SHARDMAP message on the Redis channel (the
writer refreshes when `persister reshard` announces an install), a poll
every `poll_interval_s`, a refresh before answering 421 (so two persisters
never bounce a room between them while one has not yet seen a new epoch),
and the fence in every write transaction, which is what makes it correct: a
stale map can delay a room, never let two owners commit it.

Besides the newest map (which routes) it keeps the maps back to the newest
one in force: while the newest is being drained, a room this writer owns
now but another writer owned under one of those is *gained* (`needs_drain`):
the lanes set its requests aside until `until_in_force` has drained the
epoch (see `persister.storage.shard_map`).

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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import msgspec
import psycopg

from persister.sharding import Scheme, ShardMap
from persister.storage.shard_map import (
    drain_epoch,
    leaving_writers,
    load_or_seed,
    load_routing_fenced,
)

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
        # The maps older than `current` back to the newest in force; empty
        # once `current` is in force.
        self.draining_from: tuple[ShardMap, ...] = ()
        self.leaving: frozenset[str] = frozenset()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._seed = (seed_writers, sharding)
        self._poll_interval_s = poll_interval_s
        self._load_began_at = 0.0
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._undrained_seen: int | None = None
        self._draining: asyncio.Task[None] | None = None
        # Called with each newer map as it is adopted.
        self.on_new_epoch: Callable[[ShardMap], None] | None = None
        self._drain_conn: psycopg.AsyncConnection[Any] | None = None

    def owner(self, room_id: str) -> str:
        return self.current.owner(room_id)

    @property
    def epoch(self) -> int:
        return self.current.epoch

    def watched_writers(self) -> set[str]:
        """Writers whose positions the pool must keep moving: those of the
        maps that route or are still draining, and those still leaving."""
        named = self.current.all_writers().union(*(m.all_writers() for m in self.draining_from))
        return named | self.leaving

    def needs_drain(self, room_ids: Iterable[str], instance: str) -> bool:
        """Whether `instance` gained one of `room_ids` under an epoch not yet
        in force, so that it must drain that epoch before writing them."""
        if not self.draining_from:
            return False
        return any(m.owner(room) != instance for room in room_ids for m in self.draining_from)

    def follow(self, newer: ShardMap | None) -> bool:
        """Route by `newer`, the map a write transaction's fence found, if it
        is the epoch right after ours (or ours already); False if the maps
        between are unknown here and a `refresh` is needed."""
        if newer is None or newer.epoch <= self.current.epoch:
            return newer is not None and newer.epoch == self.current.epoch
        if newer.epoch != self.current.epoch + 1:
            return False
        older = [*self.draining_from, self.current]
        self._install([newer] if newer.in_force else [*older, newer])
        return True

    async def until_in_force(self) -> None:
        """Return once the newest epoch is in force, draining it if nobody
        has; callers share one drain at a time."""
        while not self.current.in_force:
            if self._draining is None or self._draining.done():
                self._draining = asyncio.create_task(self._drain())
            await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        # On a connection of its own: the drain waits for the old epoch's
        # transactions, and loads (`refresh`) must not wait behind it.
        epoch = self.current.epoch
        if self._drain_conn is None or self._drain_conn.closed:
            self._drain_conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True, application_name="persister:shard-map-drain"
            )
        try:
            start = await drain_epoch(self._drain_conn, epoch)
        except psycopg.OperationalError:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._drain_conn.close()
            self._drain_conn = None
            raise
        self._mark_in_force(epoch, start)

    def _mark_in_force(self, epoch: int, start: int) -> None:
        if self.current.epoch == epoch and not self.current.in_force:
            self.current = msgspec.structs.replace(self.current, sequence_at_start=start)
            self.draining_from = ()
            logger.info("shard map epoch %d in force from stream position %d", epoch, start)

    async def start(self) -> None:
        async with self._lock:
            conn = await self._connection()
            await load_or_seed(conn, *self._seed)
            self._install(await load_routing_fenced(conn))
            self.leaving = frozenset(await leaving_writers(conn, self._in_force()))
        self._poller = asyncio.create_task(self._poll_forever(), name="shard-map-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._draining is not None:
            self._draining.cancel()
        if self._drain_conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._drain_conn.close()
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
                self._install(await self._load(load_routing_fenced))
                self._load_began_at = began_at
        return self.current

    async def _refresh_leaving(self) -> None:
        async with self._lock:
            in_force = self._in_force()
            self.leaving = frozenset(await self._load(lambda c: leaving_writers(c, in_force)))

    def _in_force(self) -> ShardMap:
        return self.draining_from[0] if self.draining_from else self.current

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

    def _install(self, routing: list[ShardMap]) -> None:
        """Take `routing` (from `load_routing`) unless it is older than what we have."""
        if not routing:
            return
        newest = routing[-1]
        if newest.epoch < self.current.epoch:
            return  # epochs only grow; an older read lost a race
        if newest.epoch == self.current.epoch and self.current.in_force:
            return  # being drained is not news once we know it is in force
        if newest.epoch != self.current.epoch:
            logger.info(
                "shard map epoch %d routes: writers %s, %d pin(s)%s",
                newest.epoch,
                ",".join(newest.writers),
                len(newest.pins),
                "" if newest.in_force else " (being drained)",
            )
        epoch_changed = newest.epoch != self.current.epoch
        self.current = newest
        self.draining_from = () if newest.in_force else tuple(routing[:-1])
        if epoch_changed and self.on_new_epoch is not None:
            self.on_new_epoch(newest)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self.refresh()
                await self._refresh_leaving()
                await self._drain_abandoned()
            except psycopg.Error as exc:
                logger.warning("cannot reload the shard map: %s", exc)

    async def _drain_abandoned(self) -> None:
        """`persister reshard` drains what it installs; if it died first and
        no writer has gained a room since, the epoch would never take force
        and readers would keep waiting for the writers it removed."""
        epoch = self.current.epoch
        if self.current.in_force or epoch != self._undrained_seen:
            self._undrained_seen = None if self.current.in_force else epoch
            return
        await self.until_in_force()
