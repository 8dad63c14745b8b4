"""The persister service: owns its lanes, its stream position and its publisher.

The HTTP layer calls `persist`; everything between a validated request and
its acknowledgement happens behind this one object. Background tasks keep
the instance's liveness lock, announce for dead peers, follow the peers'
positions and the shard map; if one of them dies, `failed` says why and the
process exits rather than running half-alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from persister.dag import LinkRequest
from persister.errors import NotMyShard, StoreUnavailable, Unavailable
from persister.liveness import Liveness, announce_for_dead_writers, settle_lost_connection
from persister.metrics import Metrics
from persister.positions import WriterPositions
from persister.replication.messages import EventRow
from persister.replication.peers import encode_drawn, follow_peers
from persister.replication.publisher import Publisher
from persister.sharding import ShardMap
from persister.status import InstanceStatusBody
from persister.storage import streams
from persister.storage.shard_map import stored_room_ids
from persister.wire import EventResult
from persister.writer.lane import CommittedBatch, Lane, LaneSettings
from persister.writer.ownership import LiveShardMap
from persister.writer.queue import Budget, PendingRequest

logger = logging.getLogger(__name__)

DEAD_WRITER_CHECK_S = 0.5
# While a writer stays dead, readers' minimum moves only when a peer
# announces for it: at the check interval that added ~220 ms of median stream
# lag to every other writer's events until it came back or was resharded out.
DEAD_WRITER_FOLLOW_S = 0.05
LIVENESS_CHECK_S = 1.0

Connection = psycopg.AsyncConnection[tuple[object, ...]]


class Writer:
    def __init__(
        self,
        settings: LaneSettings,
        lanes: int,
        budget: Budget,
        owners: LiveShardMap,
        publisher: Publisher,
        redis: tuple[str, str],
    ) -> None:
        self.instance = settings.instance
        self.settings = settings
        self.budget = budget
        self.owners = owners
        owners.on_new_epoch = self._refuse_moved
        self.publisher = publisher
        self.redis_url, self.channel = redis
        self.positions = WriterPositions(self.instance, 0)
        self.liveness = Liveness(settings.database_url, self.instance)
        self.metrics = Metrics(self.instance)
        self.events_persisted = 0
        self.lanes = [
            Lane(settings, self.positions, budget, owners, self._committed, self._settle,
                 self.liveness)
            for _ in range(lanes)
        ]  # fmt: skip
        self._advanced = asyncio.Event()  # set, and replaced, at every rise of the position
        for lane in self.lanes:
            lane.wait_position = self._wait_position
            lane.settle_events = self._settle_events
        self.accepting = False
        self.failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._map_refresh: asyncio.Task[None] | None = None
        # One autocommit connection per background job, apart from the lanes
        # so a long batch never delays them, and apart from each other because
        # some of them open transactions that must not interleave.
        self._connections: dict[str, Connection] = {}
        self._catch_up_lock = asyncio.Lock()
        self._hinted = 0  # the highest DRAWN sent to the peers

    async def start(self) -> None:
        try:
            await self.liveness.acquire()
            async with await psycopg.AsyncConnection.connect(self.settings.database_url) as conn:
                start = await streams.recover_position(conn, self.instance)
            await self.owners.start()
            for lane in self.lanes:
                await lane.connect()
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot reach the database: {exc}") from None
        self.positions = WriterPositions(
            self.instance, start, on_advance=self._advanced_to, on_drawn=self._drawn
        )
        for lane in self.lanes:
            lane.positions = self.positions
        await self.publisher.start()
        await self.publisher.publish_position(start)
        self.publisher.start_heartbeat(self._heartbeat)
        self._spawn([lane.run() for lane in self.lanes])
        self._spawn([
            self._every(LIVENESS_CHECK_S, self.liveness.check),
            self._follow_dead_writers(),
            follow_peers(
                self.redis_url,
                self.channel,
                self.instance,
                self._peer_announced,
                self._shard_map_announced,
            ),
        ])  # fmt: skip
        self.accepting = True
        logger.info("writer %s started at position %d", self.instance, start)

    def _spawn(self, coroutines: list[Awaitable[None]]) -> None:
        for coroutine in coroutines:
            task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
            task.add_done_callback(self._task_ended)
            self._tasks.append(task)

    def _advanced_to(self, position: int) -> None:
        self.publisher.announce(position)
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def _wait_position(self, at_least: int) -> None:
        while self.positions.position() < at_least:
            await self._advanced.wait()

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.failed.done():
            return
        error = task.exception() or RuntimeError("a writer task ended")
        logger.error("writer %s stops: %s", self.instance, error)
        self.accepting = False
        self.failed.set_result(error)

    @property
    def ready(self) -> bool:
        return self.accepting and all(lane.ready for lane in self.lanes)

    def queued_events(self) -> int:
        return self.budget.events

    def admit(self, room_id: str, size_bytes: int | None) -> None:
        """Refuse at once, before its body is read and decoded, a request that
        `persist` would refuse: not accepting, its lane without a database
        connection, or (most likely) no room in the queues for it."""
        self._lane_for(room_id)
        self.budget.check_room(size_bytes)

    def admit_batch(self, size_bytes: int | None) -> None:
        """`admit` for a batch of several rooms' requests, before it is read:
        each of them is admitted on its own once read."""
        self._check_accepting()
        self.budget.check_room(size_bytes)

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise Unavailable("persister is not accepting writes", retry_after_s=1.0)

    def _lane_for(self, room_id: str) -> Lane:
        self._check_accepting()
        lane = self.lanes[zlib.crc32(room_id.encode("utf-8")) % len(self.lanes)]
        if not lane.ready:
            raise StoreUnavailable("database connection lost; retry later")
        return lane

    async def persist(self, link: LinkRequest, size_bytes: int) -> list[EventResult]:
        """Queue a request and wait for its COMMIT; the answer is durable."""
        # Shielded: a client that hangs up must not cancel a half-done batch.
        return await asyncio.shield(self.submit(link, size_bytes))

    def submit(self, link: LinkRequest, size_bytes: int) -> asyncio.Future[list[EventResult]]:
        """Queue a request; the future is done once its COMMIT is (the answer
        is then durable). Cancelling the future does not withdraw the request."""
        lane = self._lane_for(link.room_id)
        self.budget.reserve(len(link.events), size_bytes)
        done: asyncio.Future[list[EventResult]] = asyncio.get_running_loop().create_future()
        lane.queue.put(PendingRequest(link, size_bytes, done, time.monotonic()))
        return done

    def owns(self, room_id: str) -> bool:
        """Whether this instance owns the room under the map it knows (no refresh)."""
        return self.owners.owner(room_id) == self.instance

    def position(self) -> int:
        return self.positions.position()

    async def check_owner(self, room_id: str) -> None:
        """Raise NotMyShard unless this instance owns the room under the newest map."""
        if self.owns(room_id):
            return
        # Maybe a new epoch gave us the room and the poll has not seen it yet.
        try:
            await self.owners.refresh()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot read the shard map: {exc}") from None
        owner = self.owners.owner(room_id)
        if owner != self.instance:
            raise NotMyShard(room_id, owner, self.instance)

    async def _committed(self, batch: CommittedBatch) -> None:
        self.events_persisted += batch.event_count
        position = self.positions.position()
        self.metrics.batch_committed(
            batch.event_count,
            batch.by_type_class,
            batch.seconds,
            batch.forward_extremities,
            batch.round_trips,
        )
        self.metrics.set_queue_depth(self.budget.events)
        self.metrics.set_position(position)
        await self.publisher.publish_batch(batch.events, position)

    async def _settle(self, backend_pid: int, orderings: list[int]) -> list[EventRow]:
        async with await self._settling_connection() as conn:
            await settle_lost_connection(conn, backend_pid)
            return await streams.rows_at(conn, orderings)

    async def _settle_events(
        self, backend_pid: int, event_ids: list[str], above: int
    ) -> list[EventRow]:
        async with await self._settling_connection() as conn:
            await settle_lost_connection(conn, backend_pid)
            return await streams.rows_of_events(conn, event_ids, self.instance, above)

    async def _settling_connection(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        return await psycopg.AsyncConnection.connect(
            self.settings.database_url,
            autocommit=True,
            connect_timeout=max(1, int(self.settings.connect_timeout_s)),
        )

    async def stream_rows(
        self, from_exclusive: int, to_inclusive: int, limit: int
    ) -> tuple[list[EventRow], bool]:
        """The catch-up API's read (`persister.replication.catchup`).

        One connection of its own, apart from the lanes: readers catching up
        never take a write connection, and concurrent calls queue on it
        rather than opening a connection each.
        """
        async with self._catch_up_lock:
            try:
                conn = await self._connection("catch-up")
                return await streams.rows_between(conn, from_exclusive, to_inclusive, limit)
            except psycopg.OperationalError as exc:
                self._connections.pop("catch-up", None)
                raise StoreUnavailable(f"cannot read the events stream: {exc}") from None

    async def _heartbeat(self) -> int:
        """An idle writer follows the sequence, so it never holds readers back."""
        try:
            conn = await self._connection("heartbeat")
            return await streams.heartbeat_position(conn, self.positions, self.instance)
        except psycopg.Error as exc:
            logger.warning("heartbeat cannot read the stream sequence: %s", exc)
            self._connections.pop("heartbeat", None)
            return self.positions.position()

    def _drawn(self, reached: int) -> None:
        """Tell the peers at once how far the sequence went, so that the idle
        ones announce it while this batch is still being written
        (`persister.replication.peers`)."""
        if reached > self._hinted and len(self.owners.watched_writers()) > 1:
            self._hinted = reached
            self.publisher.hint(encode_drawn(self.instance, reached))

    def _peer_announced(self, position: int) -> None:
        # A rise is announced by the positions' on_advance, at once.
        self.positions.observe(position)

    def _refuse_moved(self, _: ShardMap) -> None:
        for lane in self.lanes:
            lane.refuse_moved()

    def _shard_map_announced(self) -> None:
        """`persister reshard` announces an install before its COMMIT: a
        refresh now waits for it (the load is fenced) and routes by the new
        epoch right away, so no lane need find it out by failing its fence."""
        if self._map_refresh is None or self._map_refresh.done():
            self._map_refresh = asyncio.create_task(self._refresh_shard_map())

    async def _refresh_shard_map(self) -> None:
        try:
            await self.owners.refresh()
        except psycopg.Error as exc:
            logger.warning("cannot reload the announced shard map: %s", exc)

    async def _follow_dead_writers(self) -> None:
        """Check for dead writers every DEAD_WRITER_CHECK_S; once this writer
        announces for one, keep announcing every DEAD_WRITER_FOLLOW_S. One
        peer at a time wins a dead writer's deputy lock, so only the peer
        that announced follows quickly; the others keep checking, and take
        over at their next check if it stops."""
        interval = DEAD_WRITER_CHECK_S
        while True:
            await asyncio.sleep(interval)
            announced = await self._announce_for_dead_writers()
            interval = DEAD_WRITER_FOLLOW_S if announced else DEAD_WRITER_CHECK_S

    async def _announce_for_dead_writers(self) -> bool:
        """One round; whether it announced for any writer."""
        # Removed writers too, until they have announced the new epoch's start.
        writers = sorted(self.owners.watched_writers())
        try:
            conn = await self._connection("dead-writers")
            announced = await announce_for_dead_writers(
                conn, self.publisher, writers, self_instance=self.instance
            )
        except psycopg.Error as exc:
            logger.warning("cannot check for dead writers: %s", exc)
            self._connections.pop("dead-writers", None)
            return False
        return bool(announced)

    async def _connection(self, purpose: str) -> Connection:
        conn = self._connections.get(purpose)
        if conn is None or conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self.settings.database_url,
                autocommit=True,
                application_name=f"persister:{self.instance}:{purpose}",
            )
            self._connections[purpose] = conn
        return conn

    @staticmethod
    async def _every(interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await action()
            except psycopg.OperationalError as exc:
                # The database is away; the lanes answer 503 meanwhile.
                logger.warning("periodic %s failed: %s", action.__name__, exc)

    async def status(self) -> InstanceStatusBody:
        async with await psycopg.AsyncConnection.connect(
            self.settings.database_url, autocommit=True
        ) as conn:
            sequence = await streams.read_sequence_position(conn)
            rooms = await stored_room_ids(conn)
        return InstanceStatusBody(
            instance=self.instance,
            position=self.positions.position(),
            queued_events=self.budget.events,
            rooms_owned=sum(1 for room in rooms if self.owners.owner(room) == self.instance),
            events_persisted=self.events_persisted,
            sequence=sequence,
        )

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait until everything accepted is answered."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while not all(lane.idle for lane in self.lanes):
            if time.monotonic() > deadline or self.failed.done():
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Release everything; each step is bounded so a stuck one cannot hang shutdown."""
        self.accepting = False
        if self._map_refresh is not None:
            self._map_refresh.cancel()
        await _bounded(self.owners.stop(), timeout_s, "shard map poller")
        for task in self._tasks:
            task.cancel()
        await _bounded(
            asyncio.gather(*self._tasks, return_exceptions=True), timeout_s, "writer tasks"
        )
        for lane in self.lanes:
            await _bounded(lane.close(), timeout_s, "lane connection")
        await self.publisher.publish_position(self.positions.position())
        await _bounded(self.publisher.close(), timeout_s, "publisher")
        for conn in self._connections.values():
            await _bounded(conn.close(), timeout_s, "background connection")
        await _bounded(self.liveness.close(), timeout_s, "liveness connection")


async def _bounded(step: Awaitable[object], timeout_s: float, what: str) -> None:
    try:
        await asyncio.wait_for(step, timeout_s)
    except TimeoutError:
        logger.error("shutdown: %s did not finish within %.0f s", what, timeout_s)
    except (psycopg.Error, OSError) as exc:
        logger.warning("shutdown: closing %s failed: %s", what, exc)
