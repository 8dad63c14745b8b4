"""The lane queue: arrival order per room, and requests taken out of it."""

from __future__ import annotations

import asyncio

from persister.dag import LinkRequest
from persister.writer.queue import LaneQueue, PendingRequest


def request(room_id: str, loop: asyncio.AbstractEventLoop) -> PendingRequest:
    link = LinkRequest(room_id=room_id, room_version="10", events=[], backfilled=False)
    return PendingRequest(link, 10, loop.create_future(), 0.0)


async def test_requests_taken_out_of_the_queue_leave_the_rest_in_order() -> None:
    loop = asyncio.get_running_loop()
    queue = LaneQueue()
    a1, b1, a2, c1 = (request(r, loop) for r in ("!a:x", "!b:x", "!a:x", "!c:x"))
    for r in (a1, b1, a2, c1):
        queue.put(r)
    taken = queue.take_where(lambda r: r.link.room_id == "!a:x")
    assert taken == [a1, a2]
    assert list(queue.pending) == [b1, c1] and queue.wakeup.is_set()
    assert queue.take_where(lambda r: True) == [b1, c1]
    assert not queue.wakeup.is_set()  # nothing left to wake the lane for


async def test_parked_requests_go_back_ahead_of_those_queued_meanwhile() -> None:
    loop = asyncio.get_running_loop()
    queue = LaneQueue()
    gained1, gained2, later = (request(r, loop) for r in ("!g:x", "!g:x", "!g:x"))
    queue.park(gained1)
    queue.park(gained2)
    queue.put(later)
    assert queue.parked_rooms == {"!g:x"}
    queue.unpark()
    assert list(queue.pending) == [gained1, gained2, later]
    assert queue.parked == [] and queue.parked_rooms == set()
