"""The persister service: owns its lanes, its stream position and its publisher.

The HTTP layer calls `persist`; everything between a validated request and
its acknowledgement happens behind this one object.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import psycopg

from persister.dag import LinkRequest
from persister.errors import NotMyShard, StoreUnavailable, Unavailable
from persister.metrics import Metrics
from persister.positions import WriterPositions
from persister.replication.messages import EventRow
from persister.status import InstanceStatusBody
from persister.storage import streams
from persister.wire import EventResult
from persister.writer.lane import CommittedBatch, Lane, LaneSettings
from persister.writer.ownership import LiveShardMap
from persister.writer.queue import Budget, PendingRequest

logger = logging.getLogger(__name__)


class Announcer(Protocol):
    """Where committed rows and positions go (Redis in production)."""

    async def publish_batch(self, rows: Sequence[EventRow], position: int) -> None: ...

    async def publish_position(self, position: int) -> None: ...

    async def start(self) -> None: ...

    def start_heartbeat(
        self, get_position: Callable[[], Awaitable[int]], interval_s: float = 1.0
    ) -> None: ...

    async def close(self, flush_timeout_s: float = 1.0) -> None: ...


class Writer:
    def __init__(
        self,
        instance: str,
        settings: LaneSettings,
        lanes: int,
        budget: Budget,
        owners: LiveShardMap,
        announcer: Announcer | None,
    ) -> None:
        self.instance = instance
        self.settings = settings
        self.budget = budget
        self.owners = owners
        self.announcer = announcer
        self.positions = WriterPositions(instance, 0)
        self.metrics = Metrics(instance)
        self.events_persisted = 0
        self.lanes = [
            Lane(settings, self.positions, budget, owners, self._committed) for _ in range(lanes)
        ]
        self.accepting = False
        self._tasks: list[asyncio.Task[None]] = []
        # Reads the shared sequence for heartbeats, apart from the lanes so
        # that a long batch never delays an idle announcement.
        self._control: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def start(self) -> None:
        try:
            async with await psycopg.AsyncConnection.connect(self.settings.database_url) as conn:
                start = await streams.recover_position(conn, self.instance)
            await self.owners.start()
            for lane in self.lanes:
                await lane.connect()
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot reach the database: {exc}") from None
        self.positions = WriterPositions(self.instance, start)
        for lane in self.lanes:
            lane.positions = self.positions
        self._tasks = [asyncio.create_task(lane.run()) for lane in self.lanes]
        if self.announcer is not None:
            await self.announcer.start()
            await self.announcer.publish_position(start)
            self.announcer.start_heartbeat(self._sequence_position)
        self.accepting = True
        logger.info("writer %s started at position %d", self.instance, start)

    @property
    def ready(self) -> bool:
        return self.accepting and all(lane.ready for lane in self.lanes)

    def queued_events(self) -> int:
        return self.budget.events

    async def persist(self, link: LinkRequest, size_bytes: int) -> list[EventResult]:
        """Queue a request and wait for its COMMIT; the answer is durable."""
        if not self.accepting:
            raise Unavailable("persister is shutting down", retry_after_s=1.0)
        lane = self.lanes[zlib.crc32(link.room_id.encode("utf-8")) % len(self.lanes)]
        self.budget.reserve(len(link.events), size_bytes)
        done: asyncio.Future[list[EventResult]] = asyncio.get_running_loop().create_future()
        lane.queue.put(PendingRequest(link, size_bytes, done, time.monotonic()))
        # Shielded: a client that hangs up must not cancel a half-done batch.
        return await asyncio.shield(done)

    def position(self) -> int:
        return self.positions.position()

    async def check_owner(self, room_id: str) -> None:
        """Raise NotMyShard unless this instance owns the room under the newest map."""
        if self.owners.owner(room_id) == self.instance:
            return
        # Maybe a new epoch gave us the room and the poll has not seen it yet.
        try:
            await self.owners.refresh()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot read the shard map: {exc}") from None
        owner = self.owners.owner(room_id)
        if owner != self.instance:
            raise NotMyShard(room_id, owner, self.instance)

    async def _sequence_position(self) -> int:
        """The position an idle writer may announce: what the sequence handed out."""
        try:
            if self._control is None or self._control.closed:
                self._control = await psycopg.AsyncConnection.connect(
                    self.settings.database_url, autocommit=True
                )
            self.positions.observe(await streams.read_sequence_position(self._control))
        except psycopg.Error as exc:
            logger.warning("heartbeat cannot read the stream sequence: %s", exc)
            self._control = None
        return self.positions.position()

    async def status(self) -> InstanceStatusBody:
        async with await psycopg.AsyncConnection.connect(self.settings.database_url) as conn:
            sequence = await streams.read_sequence_position(conn)
            rooms = await conn.execute("SELECT room_id FROM rooms")
            owned = sum(
                1
                for (room_id,) in await rooms.fetchall()
                if self.owners.owner(room_id) == self.instance
            )
        return InstanceStatusBody(
            instance=self.instance,
            position=self.positions.position(),
            queued_events=self.budget.events,
            rooms_owned=owned,
            events_persisted=self.events_persisted,
            sequence=sequence,
        )

    async def _committed(self, batch: CommittedBatch) -> None:
        self.events_persisted += batch.event_count
        position = self.positions.position()
        self.metrics.batch_committed(
            batch.event_count, batch.by_type_class, batch.seconds, batch.forward_extremities
        )
        self.metrics.set_queue_depth(self.budget.events)
        self.metrics.set_position(position)
        if self.announcer is not None:
            await self.announcer.publish_batch(batch.events, position)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait until everything accepted is answered."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while not all(lane.idle for lane in self.lanes):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self) -> None:
        await self.owners.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for lane in self.lanes:
            await lane.close()
        if self.announcer is not None:
            await self.announcer.publish_position(self.positions.position())
            await self.announcer.close()
        if self._control is not None:
            await self._control.close()
