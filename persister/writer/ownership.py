"""The shard map a persister routes by, kept fresh without a restart.

Freshness comes three ways: a poll every `poll_interval_s`, a refresh before
answering 421 (so two persisters never bounce a room between them while one
has not yet seen a new epoch), and the fence in every write transaction,
which is what makes it correct: a stale map can delay a room, never let two
owners commit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from persister.sharding import Scheme, ShardMap
from persister.storage.shard_map import load_or_seed, load_shard_map

logger = logging.getLogger(__name__)


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

    async def start(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            self._install(await load_or_seed(conn, *self._seed))
        self._poller = asyncio.create_task(self._poll_forever(), name="shard-map-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def refresh(self) -> ShardMap:
        """The stored map as it is now, or as read by a load that began after this call.

        Concurrent callers share one load, so a burst of misdirected
        requests costs one query, yet nobody gets a map older than its call.
        """
        called_at = time.monotonic()
        async with self._lock:
            if self._load_began_at < called_at:
                began_at = time.monotonic()
                async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
                    stored = await load_shard_map(conn)
                if stored is not None:
                    self._install(stored)
                self._load_began_at = began_at
        return self.current

    def _install(self, shard_map: ShardMap) -> None:
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
            except psycopg.Error as exc:
                logger.warning("cannot reload the shard map: %s", exc)
