"""One writer lane: a database connection and the batch loop that feeds it.

Rooms are spread over lanes by a stable hash, so one slow transaction only
holds back the rooms of its own lane. Each loop iteration drains whatever
its queue holds (up to `max_batch_events`) into ONE transaction, and
acknowledges every request of the batch only after COMMIT.

A transaction takes one round trip when the lane remembers the batch's
rooms (`persister.writer.memory`): BEGIN, fences, the draw of its orderings,
the write and the COMMIT, pipelined; the orderings are heard as soon as they
are drawn, before the COMMIT can land. Otherwise, or when the write refuses
what memory planned, two: BEGIN, fences, loads and enough orderings for
every event of the batch; then the write and the COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGresult

from persister.dag import PLANNED, BatchPlan, EventOutcome, StoredView, link_batch
from persister.errors import (
    BadRequest,
    InvalidEvent,
    NotMyShard,
    PersisterError,
    StoreUnavailable,
)
from persister.liveness import FENCE_NS, FENCED_OUT, BackendStillRunning, FencedOut, Liveness
from persister.metrics import type_class
from persister.positions import WriterPositions
from persister.replication.messages import EventRow
from persister.storage import events_txn, pipeline
from persister.storage.pipeline import Command, Early
from persister.wire import EventResult
from persister.writer.memory import RememberedPlan, RoomsMemory
from persister.writer.ownership import LiveShardMap
from persister.writer.queue import Budget, LaneQueue, PendingRequest

logger = logging.getLogger(__name__)

IDLE = TransactionStatus.IDLE

# The most events a batch may hold to go in one round trip (see
# Lane._may_go_in_one_round_trip).
ONE_ROUND_TRIP_MAX_EVENTS = 64
# A lane that lost its connection tries again after these delays (doubling).
RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 2.0
# An idle lane checks its connection this often, giving it this long to answer.
IDLE_CHECK_S = 1.0
IDLE_CHECK_TIMEOUT_S = 2.0


class EpochChanged(Exception):
    """The shard map this lane routed by is no longer in force."""


class NotAsRemembered(Exception):
    """A batch planned from memory was refused by the database (the rooms or
    the shard map are not as remembered, or an event is stored already) and
    rolled back: it must be loaded and planned again."""


# What the database answers, within a batch written in one round trip, when
# it is not as the lane remembered: the fence's and the write's refusals
# (migrations/0006_one_round_trip.sql) and a duplicate key.
NOT_AS_REMEMBERED = frozenset({"PS004", "PS005", "23505"})


class SettleFailed(Exception):
    """The outcome of a lost COMMIT cannot be learnt: the lane must stop
    (not a PersisterError, so that no request handler swallows it)."""


@dataclass(slots=True)
class CommittedBatch:
    """What the lane tells its writer after a COMMIT, for publishing."""

    events: list[EventRow]
    event_count: int
    seconds: float
    # After the commit, per room the batch touched.
    forward_extremities: list[int]
    by_type_class: dict[str, int]
    # 1: planned from the lane's memory; 2: loaded. 0: settled after a loss.
    round_trips: int = 0


OnCommit = Callable[[CommittedBatch], Awaitable[None]]
# Given the backend pid of a lane connection lost mid-transaction and the
# orderings it held: wait until that transaction's outcome is final, and
# return the rows it did commit after all.
Settle = Callable[[int, list[int]], Awaitable[list[EventRow]]]
# The same when the orderings were never heard: given the events it wrote and
# the ordering every one of its own is above.
SettleEvents = Callable[[int, list[str], int], Awaitable[list[EventRow]]]


@dataclass
class LaneSettings:
    instance: str
    database_url: str
    max_batch_events: int
    connect_timeout_s: float
    # Send a batch's write only once every lower ordering this writer drew
    # has finished (see Lane._write_batch).
    commit_in_draw_order: bool = False
    # A lane that was idle waits this long after the first request for
    # others to join its batch (persist.max_batch_delay_ms).
    max_batch_delay_s: float = 0.0


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
        # Returns once the writer's position is at least the given ordering;
        # the writer sets it (its position rises as any lane commits).
        self.wait_position: Callable[[int], Awaitable[None]] = _no_wait
        # Set by the writer; without it no batch goes in one round trip.
        self.settle_events: SettleEvents | None = None
        self.memory = RoomsMemory()
        self.batches_in_one_round_trip = 0
        self.connection: AsyncConnection[tuple[object, ...]] | None = None
        self.busy = False
        self._connect_lock = asyncio.Lock()
        self._reconnecting: asyncio.Task[None] | None = None
        self._unparking: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.connection is not None and not self.connection.closed

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue.pending and not self.queue.parked

    async def connect(self) -> None:
        self.connection = await psycopg.AsyncConnection.connect(
            self.settings.database_url,
            connect_timeout=max(1, int(self.settings.connect_timeout_s)),
            application_name=f"persister:{self.settings.instance}",
            # Transactions are begun and committed by explicit statements in
            # the batch's pipelines (persister.storage.events_txn), not by
            # psycopg, whose implicit BEGIN would cost a round trip of its own.
            autocommit=True,
            # psycopg would prepare a query it runs often (the idle check)
            # and, at the next rollback of a failed batch, send DEALLOCATE
            # ALL, dropping the batch statements too: every later batch of
            # the lane failed until it reconnected.
            prepare_threshold=None,
        )
        await events_txn.prepare_connection(self.connection)
        self.memory.forget()

    async def close(self) -> None:
        if self._unparking is not None:
            self._unparking.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        if self.connection is not None:
            await self.connection.close()

    async def run(self) -> None:
        """The batch loop; runs until cancelled."""
        while True:
            was_idle = not self.queue.pending
            if not await self._wait_for_work(IDLE_CHECK_S):
                await self._check_idle_connection()
                continue
            if was_idle and self.settings.max_batch_delay_s > 0:
                await asyncio.sleep(self.settings.max_batch_delay_s)
            batch = self._park_gained(self.queue.take(self.settings.max_batch_events))
            if not batch:
                continue
            self.busy = True
            try:
                await self._persist_isolating_failures(batch)
            finally:
                self.busy = False
                for request in batch:
                    if request.requeued:  # parked again by `_reroute`: still queued
                        request.requeued = False
                    else:
                        self.budget.release(request.event_count, request.size_bytes)

    async def _wait_for_work(self, timeout_s: float) -> bool:
        # wait_for wakes the lane three turns of the event loop after work
        # arrives, even when it was queued already. Waking it in one turn
        # (asyncio.timeout) was measured: no gain for single events beyond
        # the noise, and with 50-event requests at full load the lanes drew
        # their orderings out of step and the stream lag p99 went from 6-7
        # to 16-18 ms (bench/README.md, fourteenth session).
        try:
            await asyncio.wait_for(self.queue.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _check_idle_connection(self) -> None:
        """A dead connection shows only when it is used. An idle lane uses
        it now and then, so that `ready` (hence /health) turns false while
        the database is away even with nothing to write, and the lane is
        reconnected before the next request rather than failing it."""
        if self.connection is None or self.connection.closed:
            return
        try:
            async with asyncio.timeout(IDLE_CHECK_TIMEOUT_S):
                await self.connection.execute("SELECT 1")
        except (psycopg.OperationalError, TimeoutError) as exc:
            logger.warning("idle database connection is unusable: %s", exc or "no answer")
            await self._drop_connection()

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

    def refuse_moved(self) -> None:
        """Answer 421 at once for the queued requests whose room a new map
        gave to another writer: they would learn it only when the lane got to
        them, a batch or more later, and their new owner may be idle."""
        instance = self.settings.instance
        for request in self.queue.take_where(
            lambda r: self.owners.owner(r.link.room_id) != instance
        ):
            self.budget.release(request.event_count, request.size_bytes)
            if not request.done.done():
                room_id = request.link.room_id
                request.done.set_exception(
                    NotMyShard(room_id, self.owners.owner(room_id), instance)
                )

    def _park_gained(self, batch: list[PendingRequest]) -> list[PendingRequest]:
        """Set aside the requests for rooms this writer gained under an epoch
        not yet in force (and any later request for those rooms, to keep
        their order) until it is; returns the rest, which go on at once.

        The lane does not wait for the drain itself: the other rooms of the
        batch and of the queue were never moved and must not pause.
        """
        if not self.queue.parked and not self.owners.draining_from:
            return batch
        instance = self.settings.instance
        rest = []
        for request in batch:
            room_id = request.link.room_id
            if room_id in self.queue.parked_rooms or self.owners.needs_drain((room_id,), instance):
                self.queue.park(request)
            else:
                rest.append(request)
        if self.queue.parked and (self._unparking is None or self._unparking.done()):
            self._unparking = asyncio.create_task(self._unpark_when_in_force())
        return rest

    async def _unpark_when_in_force(self) -> None:
        try:
            await self.owners.until_in_force()
        except psycopg.Error as exc:
            logger.warning("cannot put the new shard map in force: %s", exc)
            error = StoreUnavailable("the shard map is changing and cannot be read; retry")
            for request in self.queue.take_parked():
                self.budget.release(request.event_count, request.size_bytes)
                if not request.done.done():
                    request.done.set_exception(error)
            return
        self.queue.unpark()

    def _gains_rooms_of(self, batch: list[PendingRequest]) -> bool:
        return self.owners.needs_drain(
            (request.link.room_id for request in batch), self.settings.instance
        )

    def _owns_rooms_of(self, batch: list[PendingRequest]) -> bool:
        instance = self.settings.instance
        return all(self.owners.owner(request.link.room_id) == instance for request in batch)

    async def _reroute(self, batch: list[PendingRequest]) -> None:
        """A new shard map took force: moved rooms get 421, the rest go on."""
        try:
            await self.owners.refresh()
        except psycopg.Error as exc:
            # Raised here, inside the EpochChanged handler, it would end the
            # lane's task and with it the whole writer.
            logger.warning("cannot reload the shard map to reroute a batch: %s", exc)
            _fail_all(batch, StoreUnavailable("cannot read the shard map; retry later"))
            return
        kept = []
        for request in batch:
            owner = self.owners.owner(request.link.room_id)
            if owner == self.settings.instance:
                kept.append(request)
            elif not request.done.done():
                request.done.set_exception(
                    NotMyShard(request.link.room_id, owner, self.settings.instance)
                )
        going_on = self._park_gained(kept)
        if len(going_on) < len(kept):
            # Back in the queue: their budget is released when they are
            # written, not with this batch.
            not_parked = {id(request) for request in going_on}
            for request in kept:
                request.requeued = id(request) not in not_parked
        if going_on:
            await self._persist_isolating_failures(going_on)

    async def _ensure_connected(self) -> None:
        async with self._connect_lock:
            if self.ready:
                return
            try:
                await self.connect()
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"database unavailable: {exc}") from None

    async def _close_connection(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        self.connection = None

    async def _drop_connection(self) -> None:
        await self._close_connection()
        # The writer answers 503 at once for a lane that is not ready, so no
        # batch would come to reconnect it: it reconnects by itself.
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(
                self._reconnect(), name=f"reconnect:{self.settings.instance}"
            )

    async def _reconnect(self) -> None:
        """Until the lane has a connection again, with capped backoff."""
        delay = RECONNECT_INITIAL_S
        while not self.ready:
            try:
                await self._ensure_connected()
            except StoreUnavailable as exc:
                logger.warning("lane cannot reconnect yet (next try in %.1fs): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
            else:
                logger.info("lane reconnected to the database")

    async def _persist(self, batch: list[PendingRequest]) -> None:
        # Whatever went wrong, memory may no longer be what is stored.
        try:
            if self._may_go_in_one_round_trip(batch):
                planned = self.memory.plan([r.link for r in batch], self.owners.epoch)
                if planned is not None:
                    try:
                        await self._persist_remembered(batch, planned)
                        return
                    except NotAsRemembered as exc:
                        self.memory.forget()
                        logger.info("a batch planned from memory was refused (%s): loading", exc)
            await self._persist_loaded(batch)
        except BaseException:
            self.memory.forget()
            raise

    def _may_go_in_one_round_trip(self, batch: list[PendingRequest]) -> bool:
        # Rooms gained with an epoch not yet in force wait for it, which only
        # the loaded path checks; and the settings that need the orderings
        # before the write is sent keep two round trips. So do big batches:
        # the round trip saved is a small part of their transaction, and
        # their orderings, heard only once the whole write has been sent,
        # held the position back for longer (50-event requests: stream lag
        # p99 95 ms in a closed loop against 51 with two round trips).
        return (
            self.settle_events is not None
            and not self.settings.commit_in_draw_order
            and sum(request.event_count for request in batch) <= ONE_ROUND_TRIP_MAX_EVENTS
            and not self._gains_rooms_of(batch)
        )

    async def _persist_loaded(self, batch: list[PendingRequest]) -> None:
        conn = self.connection
        assert conn is not None
        started = time.perf_counter()
        # Filled as soon as orderings are drawn, so that a rollback at any
        # later point still finishes them and no gap stalls the position.
        allocated: list[int] = []
        backend_pid = conn.info.backend_pid
        try:
            # Two round trips: BEGIN + fences + loads + orderings (inside
            # _write_batch), then the write and the COMMIT together.
            plan, view, assigned, write = await self._write_batch(batch, allocated)
            await events_txn.commit_txn(conn, write)
        except psycopg.OperationalError:
            if allocated:
                # The COMMIT may still land: answer now (a retry is safe), and
                # the requests queued behind it too, for settling may take as
                # long as the database is away; finish the orderings only
                # once their fate is known.
                await self._fail_while_settling(batch)
                await self._settle_lost(backend_pid, allocated)
            raise
        except BaseException:
            try:
                await self._end_failed_transaction()
            finally:
                # The server answered (or the COMMIT was never sent): rolled
                # back, they can never commit.
                self.positions.finish(allocated)
            raise
        self.positions.finish(allocated)
        self.memory.remember([r.link for r in batch], view, assigned, self.owners.epoch)
        await self._hand_over(batch, plan, view, assigned, started, round_trips=2)

    async def _persist_remembered(
        self, batch: list[PendingRequest], remembered: RememberedPlan
    ) -> None:
        """One round trip for a batch planned from memory. Raises
        NotAsRemembered, with the transaction rolled back, if the database
        refuses the plan."""
        view, plan = remembered.view, remembered.plan
        conn = self.connection
        assert conn is not None
        assert self.liveness.epoch is not None
        started = time.perf_counter()
        instance = self.settings.instance
        commands = (
            events_txn.BEGIN,
            events_txn.routed_fence_command(
                FENCE_NS, instance, self.liveness.epoch, self.owners.epoch
            ),
            events_txn.draw_command(len(plan.new_events)),
            events_txn.write_remembered_command(
                plan,
                remembered.forward_extremities,
                view.room_versions,
                instance,
                _now_ms(),
                self.positions.position(),
            ),
            events_txn.COMMIT,
        )
        token = self.positions.begin_fetch()
        above = self.positions.fetch_floor(token)
        allocated: list[int] = []

        def drawn(result: PGresult) -> None:
            # Heard while the write runs, before the COMMIT can land: from
            # here on these orderings hold the position, as in two round trips.
            allocated.extend(events_txn.drawn(conn, result))
            self.positions.end_fetch(token, allocated)

        backend_pid = conn.info.backend_pid
        try:
            await pipeline.round_trip(conn, commands, Early(2, drawn))
        except psycopg.OperationalError:
            # The COMMIT left with the rest: it may land.
            await self._fail_while_settling(batch)
            if allocated:
                await self._settle_lost(backend_pid, allocated)
            else:
                event_ids = [event.event_id for event in plan.new_events]
                await self._settle_unheard(backend_pid, token, event_ids, above)
            raise
        except BaseException as exc:
            try:
                await self._end_failed_transaction()
            finally:
                if allocated:
                    self.positions.finish(allocated)
                else:
                    self.positions.abandon_fetch(token)
            if isinstance(exc, psycopg.Error) and exc.sqlstate == FENCED_OUT:
                raise FencedOut(f"instance {instance} was taken over") from exc
            if isinstance(exc, psycopg.Error) and exc.sqlstate in NOT_AS_REMEMBERED:
                raise NotAsRemembered(exc.sqlstate) from exc
            raise
        self.positions.finish(allocated)
        assigned = dict(zip((e.event_id for e in plan.new_events), allocated, strict=True))
        self.memory.remember([r.link for r in batch], view, assigned, self.owners.epoch)
        self.batches_in_one_round_trip += 1
        await self._hand_over(batch, plan, view, assigned, started, round_trips=1)

    async def _hand_over(
        self,
        batch: list[PendingRequest],
        plan: BatchPlan,
        view: StoredView,
        assigned: dict[str, int],
        started: float,
        round_trips: int,
    ) -> None:
        """Answer a committed batch's requests and give its rows to the writer."""
        # No await between the orderings' finish() and handing the rows to
        # the publisher: a heartbeat must not announce a position covering
        # rows it lacks.
        elapsed = time.perf_counter() - started
        rooms = {request.link.room_id for request in batch}
        extremities = [len(view.forward_extremities.get(room, ())) for room in rooms]
        self._acknowledge(batch, plan, assigned)
        await self.on_commit(_committed(plan, assigned, elapsed, extremities, round_trips))

    async def _fail_while_settling(self, batch: list[PendingRequest]) -> None:
        unavailable = StoreUnavailable("database connection lost; retry later")
        # Not ready while settling, which lasts as long as the outage:
        # /health says 503 and new requests are refused at once.
        await self._close_connection()
        _fail_all(batch, unavailable)
        self._refuse_queued(unavailable)

    async def _end_failed_transaction(self) -> None:
        """Roll back what a failed batch left open, so the connection can serve
        the next one (the lane's connection is in autocommit mode: nothing
        ends a transaction but this or COMMIT)."""
        conn = self.connection
        if conn is not None and not conn.closed and conn.info.transaction_status != IDLE:
            await conn.rollback()

    async def _write_batch(
        self, batch: list[PendingRequest], allocated: list[int]
    ) -> tuple[BatchPlan, StoredView, dict[str, int], Command]:
        """Begin the transaction and plan its write, for the caller to send
        with the COMMIT."""
        assert self.connection is not None
        assert self.liveness.epoch is not None
        # Both fences come before any ordering is drawn (see persister.liveness
        # and persister.storage.shard_map for why that order matters).
        fence = events_txn.fence_command(
            FENCE_NS, self.settings.instance, self.liveness.epoch, self.owners.epoch
        )
        load = events_txn.load_command(*_batch_ids(batch), _most_orderings(batch))
        token = self.positions.begin_fetch()
        try:
            fenced, view, forward, backfill = await events_txn.begin_batch_txn(
                self.connection, fence, load
            )
        except BaseException as exc:
            # Whatever was drawn belongs to a transaction that never commits.
            self.positions.abandon_fetch(token)
            if isinstance(exc, psycopg.Error) and exc.sqlstate == FENCED_OUT:
                raise FencedOut(f"instance {self.settings.instance} was taken over") from exc
            raise
        self.positions.end_fetch(token, forward)
        allocated.extend(forward)
        # Each request was checked against the map when it arrived; a poll or
        # another request's 421 may have moved the map on since, so the rooms
        # are checked again under the epoch this transaction has fenced.
        # A newer epoch than ours: its lock is held too, so if none of the
        # batch's rooms moved the batch goes on under it, without a rollback.
        if fenced.epoch != self.owners.epoch and not self.owners.follow(fenced.newer):
            raise EpochChanged()
        if not self._owns_rooms_of(batch):
            raise EpochChanged()
        if not fenced.in_force and self._gains_rooms_of(batch):
            raise EpochChanged()  # not yet in force: `_reroute` parks those requests
        plan = link_batch(view, [request.link for request in batch])
        forward_count = plan.new_backfilled.count(False)
        # Drawn for events that turned out to be duplicates or invalid: no
        # row will ever hold them, so they are holes from now on.
        spare = allocated[forward_count:]
        del allocated[forward_count:]
        self.positions.finish(spare)
        forward = allocated
        if forward and self.settings.commit_in_draw_order:
            # Lanes draw from one sequence, so a lane that commits while
            # another lane's lower orderings are open has its events held
            # back from readers until that other transaction ends: the
            # stream lag was a whole transaction at p99. Waiting here for
            # the position to reach just below our first ordering makes
            # the lanes commit in the order they drew; their first round
            # trips still overlap. The lane holding the lowest open ordering
            # never waits, so they cannot wait on each other in a circle.
            await self.wait_position(forward[0] - 1)
        orderings = _interleave(plan.new_backfilled, forward, backfill)
        position = self.positions.position_if_finished(forward) if forward else None
        write = events_txn.write_command(
            plan, orderings, view.room_versions, self.settings.instance, _now_ms(), position
        )
        assigned = {e.event_id: o for e, o in zip(plan.new_events, orderings, strict=True)}
        return plan, view, assigned, write

    def _refuse_queued(self, error: PersisterError) -> None:
        """Answer every request waiting in this lane's queue with `error`."""
        for request in self.queue.take(sys.maxsize):
            self.budget.release(request.event_count, request.size_bytes)
            if not request.done.done():
                request.done.set_exception(error)

    async def _settle_lost(self, backend_pid: int, allocated: list[int]) -> None:
        """A lost COMMIT may still land: wait for it, and publish what did land,
        so the position never passes rows that readers were not given.

        Until the database answers, the outcome is unknown, so the orderings
        stay unfinished and the position waits (as the promise requires);
        this retries with capped backoff meanwhile. An error that retrying
        cannot cure ends the lane, and with it the process: a restart takes
        the instance over, ending the lost backend first.
        """
        rows = await self._settled(backend_pid, lambda: self.settle(backend_pid, allocated))
        self.positions.finish(allocated)
        await self.on_commit(CommittedBatch(rows, len(rows), 0.0, [], {}))

    async def _settle_unheard(
        self, backend_pid: int, token: int, event_ids: list[str], above: int
    ) -> None:
        """`_settle_lost` for a batch sent in one round trip whose orderings
        were never heard: the fetch stays open, holding the position, until
        the database says which of the batch's events landed. Whatever else
        that transaction drew can never be committed."""
        settle_events = self.settle_events
        assert settle_events is not None
        rows = await self._settled(
            backend_pid, lambda: settle_events(backend_pid, event_ids, above)
        )
        landed = [row.stream_ordering for row in rows]
        self.positions.end_fetch(token, landed)
        self.positions.finish(landed)
        await self.on_commit(CommittedBatch(rows, len(rows), 0.0, [], {}))

    async def _settled(
        self, backend_pid: int, settle: Callable[[], Awaitable[list[EventRow]]]
    ) -> list[EventRow]:
        delay = RECONNECT_INITIAL_S
        while True:
            try:
                rows = await settle()
                break
            except (psycopg.OperationalError, BackendStillRunning) as exc:
                logger.warning(
                    "cannot settle lost transaction of backend %d yet (next try in %.1fs): %s",
                    backend_pid, delay, exc,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
            except psycopg.Error as exc:
                raise SettleFailed(
                    f"cannot settle lost transaction of backend {backend_pid}: {exc}"
                ) from exc
        if rows:
            logger.warning("a COMMIT whose answer was lost did land: %d events", len(rows))
        else:
            logger.warning("a COMMIT whose answer was lost wrote no new event")
        return rows

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


def _most_orderings(batch: Sequence[PendingRequest]) -> tuple[int, int]:
    """Forward and backfill orderings enough for every event of the batch."""
    forward = backfill = 0
    for request in batch:
        if request.link.backfilled:
            backfill += request.event_count
        else:
            forward += request.event_count
    return forward, backfill


def _interleave(backfilled: Sequence[bool], forward: list[int], backfill: list[int]) -> list[int]:
    forward_iter, backfill_iter = iter(forward), iter(backfill)
    return [next(backfill_iter) if b else next(forward_iter) for b in backfilled]


def _committed(
    plan: BatchPlan,
    assigned: dict[str, int],
    seconds: float,
    extremities: list[int],
    round_trips: int,
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
        round_trips=round_trips,
    )


async def _no_wait(position: int) -> None:
    return None


def _fail_all(batch: Sequence[PendingRequest], error: PersisterError) -> None:
    for request in batch:
        if not request.done.done():
            request.done.set_exception(error)


def _now_ms() -> int:
    return int(time.time() * 1000)
