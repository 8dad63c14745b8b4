"""Bounded queues of accepted persist requests, and how batches are cut.

A request waits here between the HTTP handler and the database. Bounds are
counted in events and bytes over the whole persister, so a flood is refused
with 503 instead of growing memory without limit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from persister.dag import LinkRequest
from persister.errors import Saturated
from persister.wire import EventResult


@dataclass(slots=True)
class PendingRequest:
    link: LinkRequest
    size_bytes: int
    done: asyncio.Future[list[EventResult]]
    enqueued_at: float
    # Parked again while its lane was writing the batch it was taken in.
    requeued: bool = False

    @property
    def event_count(self) -> int:
        return len(self.link.events)


@dataclass(slots=True)
class Budget:
    """What the whole persister may hold in its queues."""

    max_events: int
    max_bytes: int
    retry_after_s: float
    events: int = 0
    bytes: int = 0
    # Bytes per event of the requests reserved so far (a moving average): how
    # many events a body holds, guessed before it is read.
    event_bytes: float = 0.0

    def reserve(self, events: int, size_bytes: int) -> None:
        if self.events + events > self.max_events or self.bytes + size_bytes > self.max_bytes:
            raise self._saturated()
        self.events += events
        self.bytes += size_bytes
        if events:
            sample = size_bytes / events
            weight = 0.1 if self.event_bytes else 1.0
            self.event_bytes += weight * (sample - self.event_bytes)

    def check_room(self, size_bytes: int | None) -> None:
        """Refuse, before its body is read, a request of `size_bytes` that
        would most likely not fit: bytes exactly, events by the average size.

        Under a flood most requests are refused; refusing them here costs
        next to nothing, where decoding and validating them first would take
        the CPU the accepted ones need. `reserve` still checks exactly. With
        empty queues nothing is refused here, so a request that fits alone
        is never refused for a wrong guess.
        """
        if not (self.events or self.bytes) or not size_bytes:
            return
        guess = int(size_bytes / self.event_bytes) if self.event_bytes else 1
        if self.events + guess > self.max_events or self.bytes + size_bytes > self.max_bytes:
            raise self._saturated()

    def _saturated(self) -> Saturated:
        return Saturated(
            f"persister is saturated ({self.events} events queued); retry later",
            retry_after_s=self.retry_after_s,
        )

    def release(self, events: int, size_bytes: int) -> None:
        self.events -= events
        self.bytes -= size_bytes


@dataclass(slots=True)
class LaneQueue:
    """Requests for the rooms of one writer lane, in arrival order.

    Taking whole requests in FIFO order keeps each room's events in order;
    a lane runs one transaction at a time, so a room never has two.
    """

    pending: deque[PendingRequest] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Requests set aside, in order, until the shard-map epoch that gave
    # their rooms to this writer is in force; and those rooms.
    parked: list[PendingRequest] = field(default_factory=list)
    parked_rooms: set[str] = field(default_factory=set)

    def put(self, request: PendingRequest) -> None:
        self.pending.append(request)
        self.wakeup.set()

    def take(self, max_events: int) -> list[PendingRequest]:
        batch: list[PendingRequest] = []
        count = 0
        while self.pending:
            nxt = self.pending[0]
            if batch and count + nxt.event_count > max_events:
                break
            batch.append(self.pending.popleft())
            count += nxt.event_count
        if not self.pending:
            self.wakeup.clear()
        return batch

    async def wait(self) -> None:
        await self.wakeup.wait()

    def take_where(self, chosen: Callable[[PendingRequest], bool]) -> list[PendingRequest]:
        """Remove and return the queued requests `chosen` picks, in order."""
        taken = [request for request in self.pending if chosen(request)]
        if taken:
            self.pending = deque(r for r in self.pending if not chosen(r))
            if not self.pending:
                self.wakeup.clear()
        return taken

    def park(self, request: PendingRequest) -> None:
        self.parked.append(request)
        self.parked_rooms.add(request.link.room_id)

    def unpark(self) -> None:
        """Put the parked requests back at the head of the queue, in their
        order: anything queued meanwhile arrived after them."""
        self.pending.extendleft(reversed(self.take_parked()))
        if self.pending:
            self.wakeup.set()

    def take_parked(self) -> list[PendingRequest]:
        parked, self.parked = self.parked, []
        self.parked_rooms.clear()
        return parked
