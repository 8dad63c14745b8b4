"""One writer lane: a database connection and the batch loop that feeds it.

Rooms are spread over lanes by a stable hash, so one slow transaction only
holds back the rooms of its own lane. Each loop iteration drains whatever
its queue holds (up to `max_batch_events`) into ONE transaction, allocates
stream orderings as late as it can inside it, and acknowledges every request
of the batch only after COMMIT.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import AsyncConnection

from persister.dag import PLANNED, BatchPlan, EventOutcome, link_batch
from persister.errors import (
    BadRequest,
    InvalidEvent,
    NotMyShard,
    PersisterError,
    StoreUnavailable,
)
from persister.liveness import FencedOut, Liveness, fence_check_txn
from persister.metrics import type_class
from persister.positions import WriterPositions
from persister.replication.messages import EventRow
from persister.storage import events_txn
from persister.storage.shard_map import fence_txn
from persister.storage.streams import upsert_stream_position_txn
from persister.wire import EventResult
from persister.writer.ownership import LiveShardMap
from persister.writer.queue import Budget, LaneQueue, PendingRequest

logger = logging.getLogger(__name__)


class EpochChanged(Exception):
    """The shard map this lane routed by is no longer in force."""


@dataclass(slots=True)
class CommittedBatch:
    """What the lane tells its writer after a COMMIT, for publishing."""

    events: list[EventRow]
    event_count: int
    seconds: float
    # After the commit, per room the batch touched.
    forward_extremities: list[int]
    by_type_class: dict[str, int]


OnCommit = Callable[[CommittedBatch], Awaitable[None]]
# Given the backend pid of a lane connection lost mid-transaction and the
# orderings it held: wait until that transaction's outcome is final, and
# return the rows it did commit after all.
Settle = Callable[[int, list[int]], Awaitable[list[EventRow]]]


@dataclass
class LaneSettings:
    instance: str
    database_url: str
    max_batch_events: int
    connect_timeout_s: float


class Lane:
    def __init__(
        self,
        settings: LaneSettings,
        positions: WriterPositions,
        budget: Budget,
        owners: LiveShardMap,
        on_commit: OnCommit,
        settle: Settle,
        liveness: Liveness,
    ) -> None:
        self.settings = settings
        self.owners = owners
        self.settle = settle
        self.liveness = liveness
        self.positions = positions
        self.budget = budget
        self.on_commit = on_commit
        self.queue = LaneQueue()
        self.connection: AsyncConnection[tuple[object, ...]] | None = None
        self.busy = False

    @property
    def ready(self) -> bool:
        return self.connection is not None and not self.connection.closed

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue.pending

    async def connect(self) -> None:
        self.connection = await psycopg.AsyncConnection.connect(
            self.settings.database_url,
            connect_timeout=max(1, int(self.settings.connect_timeout_s)),
            application_name=f"persister:{self.settings.instance}",
            # No server-side prepared statements: a generic plan chosen while
            # the tables were small (a sequential scan of `events`) would be
            # kept for the connection's life and slow every batch as the
            # table grows, if statistics lag (autovacuum off or behind).
            prepare_threshold=None,
        )

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def run(self) -> None:
        """The batch loop; runs until cancelled."""
        while True:
            await self.queue.wait()
            batch = self.queue.take(self.settings.max_batch_events)
            if not batch:
                continue
            self.busy = True
            try:
                await self._persist_isolating_failures(batch)
            finally:
                self.busy = False
                for request in batch:
                    self.budget.release(request.event_count, request.size_bytes)

    async def _persist_isolating_failures(self, batch: list[PendingRequest]) -> None:
        try:
            await self._ensure_connected()
            await self._persist(batch)
        except EpochChanged:
            await self._reroute(batch)
        except FencedOut:
            _fail_all(batch, StoreUnavailable("this instance was taken over; retry"))
            raise
        except PersisterError as exc:
            _fail_all(batch, exc)
        except psycopg.OperationalError as exc:
            logger.warning("database connection lost: %s", exc)
            await self._drop_connection()
            _fail_all(batch, StoreUnavailable("database unavailable; retry later"))
        except psycopg.Error as exc:
            if len(batch) == 1:
                logger.warning("request rejected by the database: %s", exc)
                _fail_all(batch, BadRequest(f"the database refused the events: {exc.sqlstate}"))
                return
            # One request broke the batch: persist each alone so that only it fails.
            for request in batch:
                await self._persist_isolating_failures([request])

    async def _reroute(self, batch: list[PendingRequest]) -> None:
        """A new shard map took force: moved rooms get 421, the rest go on."""
        await self.owners.refresh()
        kept = []
        for request in batch:
            owner = self.owners.owner(request.link.room_id)
            if owner == self.settings.instance:
                kept.append(request)
            elif not request.done.done():
                request.done.set_exception(
                    NotMyShard(request.link.room_id, owner, self.settings.instance)
                )
        if kept:
            await self._persist_isolating_failures(kept)

    async def _ensure_connected(self) -> None:
        if self.ready:
            return
        try:
            await self.connect()
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"database unavailable: {exc}") from None

    async def _drop_connection(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        self.connection = None

    async def _persist(self, batch: list[PendingRequest]) -> None:
        assert self.connection is not None
        started = time.perf_counter()
        # Filled as soon as orderings are allocated, so that a rollback at
        # any later point still finishes them and no gap stalls the position.
        allocated: list[int] = []
        backend_pid = self.connection.info.backend_pid
        try:
            async with self.connection.transaction():
                plan, assigned, extremities = await self._write_batch(batch, allocated)
        except psycopg.OperationalError:
            if allocated:
                await self._settle_lost(backend_pid, allocated)
            raise
        finally:
            self.positions.finish(allocated)
        # No await between finish() and handing the rows to the publisher:
        # a heartbeat must not announce a position covering rows it lacks.
        elapsed = time.perf_counter() - started
        self._acknowledge(batch, plan, assigned)
        await self.on_commit(_committed(plan, assigned, elapsed, extremities))

    async def _write_batch(
        self, batch: list[PendingRequest], allocated: list[int]
    ) -> tuple[BatchPlan, dict[str, int], list[int]]:
        assert self.connection is not None
        cur = self.connection.cursor()
        assert self.liveness.epoch is not None
        # Both fences come before any ordering is drawn (see liveness and
        # storage.shard_map for why that order matters).
        await fence_check_txn(cur, self.settings.instance, self.liveness.epoch)
        if await fence_txn(cur) != self.owners.epoch:
            raise EpochChanged()
        view = await events_txn.load_view_txn(cur, *_batch_ids(batch))
        plan = link_batch(view, [request.link for request in batch])
        forward_count = plan.new_backfilled.count(False)
        token = self.positions.begin_fetch()
        try:
            forward, backfill = await events_txn.allocate_orderings_txn(
                cur, forward_count, len(plan.new_backfilled) - forward_count
            )
        except BaseException:
            self.positions.abandon_fetch(token)
            raise
        self.positions.end_fetch(token, forward)
        allocated.extend(forward)
        orderings = _interleave(plan.new_backfilled, forward, backfill)
        await events_txn.write_plan_txn(
            cur, plan, orderings, view.room_versions, self.settings.instance, _now_ms()
        )
        if forward:
            await upsert_stream_position_txn(
                cur, "events", self.settings.instance, self.positions.position_if_finished(forward)
            )
        assigned = {e.event_id: o for e, o in zip(plan.new_events, orderings, strict=True)}
        rooms = {request.link.room_id for request in batch}
        extremities = [len(view.forward_extremities.get(room, ())) for room in rooms]
        return plan, assigned, extremities

    async def _settle_lost(self, backend_pid: int, allocated: list[int]) -> None:
        """A lost COMMIT may still land: wait for it, and publish what did land,
        so the position never passes rows that readers were not given."""
        try:
            rows = await self.settle(backend_pid, allocated)
        except psycopg.Error as exc:
            logger.error("cannot settle lost transaction of backend %d: %s", backend_pid, exc)
            return
        if rows:
            logger.warning("a COMMIT whose answer was lost did land: %d events", len(rows))
        self.positions.finish(allocated)
        await self.on_commit(CommittedBatch(rows, len(rows), 0.0, [], {}))

    def _acknowledge(
        self, batch: list[PendingRequest], plan: BatchPlan, assigned: dict[str, int]
    ) -> None:
        for request, outcome in zip(batch, plan.outcomes, strict=True):
            if request.done.done():
                continue
            if isinstance(outcome, InvalidEvent):
                request.done.set_exception(outcome)
            else:
                request.done.set_result([_result(o, assigned) for o in outcome])


def _result(outcome: EventOutcome, assigned: dict[str, int]) -> EventResult:
    ordering = outcome.stored_ordering
    if ordering is None or ordering == PLANNED:
        ordering = assigned[outcome.event_id]
    return EventResult(outcome.event_id, ordering, outcome.depth, outcome.duplicate)


def _batch_ids(batch: Sequence[PendingRequest]) -> tuple[list[str], list[str], list[str]]:
    rooms: dict[str, None] = {}
    event_ids: list[str] = []
    prev_ids: list[str] = []
    for request in batch:
        rooms[request.link.room_id] = None
        for event in request.link.events:
            event_ids.append(event.event_id)
            prev_ids.extend(event.prev_event_ids)
    return list(rooms), event_ids, prev_ids


def _interleave(backfilled: Sequence[bool], forward: list[int], backfill: list[int]) -> list[int]:
    forward_iter, backfill_iter = iter(forward), iter(backfill)
    return [next(backfill_iter) if b else next(forward_iter) for b in backfilled]


def _committed(
    plan: BatchPlan, assigned: dict[str, int], seconds: float, extremities: list[int]
) -> CommittedBatch:
    rows = [
        EventRow(assigned[e.event_id], e.event_id, e.room_id, e.type, e.state_key, e.sender)
        for e, backfilled in zip(plan.new_events, plan.new_backfilled, strict=True)
        if not backfilled
    ]
    return CommittedBatch(
        events=rows,
        event_count=len(plan.new_events),
        seconds=seconds,
        forward_extremities=extremities,
        by_type_class=Counter(type_class(e.type, e.state_key) for e in plan.new_events),
    )


def _fail_all(batch: Sequence[PendingRequest], error: PersisterError) -> None:
    for request in batch:
        if not request.done.done():
            request.done.set_exception(error)


def _now_ms() -> int:
    return int(time.time() * 1000)
