"""A batch whose shard map changed under it (persister.writer.lane.Lane._reroute).

Requests for rooms this writer gained under an epoch not yet in force are
parked again, in order, until it is; the rest go on at once. A parked
request still counts against the persister's queue budget until it is
written: released with the batch it was first taken in, it was released a
second time when written, and the budget drifted below what was queued.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from persister.dag import LinkRequest
from persister.positions import WriterPositions
from persister.writer.lane import EpochChanged, Lane, LaneSettings
from persister.writer.queue import Budget, PendingRequest

GAINED, KEPT = "!gained:test", "!kept:test"


class MapGainingARoom:
    """A shard map that, once refreshed, gives this writer GAINED under an
    epoch that is not in force until `in_force` is set."""

    def __init__(self) -> None:
        self.epoch = 1
        self.draining_from: tuple[object, ...] = ()
        self.in_force = asyncio.Event()

    def owner(self, room_id: str) -> str:
        return "w1"

    def needs_drain(self, room_ids: Any, instance: str) -> bool:
        return bool(self.draining_from) and GAINED in room_ids

    async def refresh(self) -> None:
        self.draining_from = (object(),)

    async def until_in_force(self) -> None:
        await self.in_force.wait()
        self.draining_from = ()


async def until_idle(lane: Lane) -> None:
    for _ in range(100):
        if not lane.busy:
            return
        await asyncio.sleep(0)
    raise AssertionError("the lane never finished its batch")


def queue_request(lane: Lane, budget: Budget, room_id: str) -> PendingRequest:
    link = LinkRequest(room_id, "10", False, [])
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    request = PendingRequest(link, 100, done, 0.0)
    budget.reserve(request.event_count, request.size_bytes)  # as Writer.submit does
    lane.queue.put(request)
    return request


async def test_a_request_parked_again_by_a_reroute_keeps_its_budget_until_written() -> None:
    owners = MapGainingARoom()
    budget = Budget(100, 100_000, 0.5)
    unused = cast(Any, None)
    settings = LaneSettings("w1", "postgresql://unused", 100, 1.0)
    lane = Lane(
        settings, WriterPositions("w1", 0), budget, cast(Any, owners), unused, unused, unused
    )
    written: list[list[str]] = []

    async def connected() -> None:
        return None

    async def persist(batch: list[PendingRequest]) -> None:
        if not written and not owners.draining_from:
            written.append([])
            raise EpochChanged()  # the map moved on while the batch was written
        written.append([r.link.room_id for r in batch])
        for request in batch:
            request.done.set_result([])

    lane._ensure_connected = connected  # type: ignore[method-assign]
    lane._persist = persist  # type: ignore[method-assign]
    gained, kept = queue_request(lane, budget, GAINED), queue_request(lane, budget, KEPT)
    running = asyncio.ensure_future(lane.run())
    try:
        await asyncio.wait_for(kept.done, 5)
        await until_idle(lane)
        assert not gained.done.done() and lane.queue.parked == [gained]
        assert budget.bytes == 100, "the parked request no longer counts against the budget"
        owners.in_force.set()
        await asyncio.wait_for(gained.done, 5)
        await until_idle(lane)
        assert written[1:] == [[KEPT], [GAINED]]
        assert (budget.events, budget.bytes) == (0, 0)
    finally:
        running.cancel()
