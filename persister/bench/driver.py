"""The load drivers: closed loop (C requests in flight) and open loop
(requests leave on a schedule at a target events/s).

Both keep each room's requests in order, as an event creator must. In the
closed loop a sender takes the oldest request whose room has nothing in
flight, so one busy room cannot tie up all C senders. In the open loop
requests leave at their scheduled times whatever happens; the client queues
a room's requests behind each other (those waiting leave together when the
room's turn comes), and that wait counts as latency.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from persister import client as client_mod
from persister.bench.stats import PhaseRecorder
from persister.bench.workload import BenchRequest
from persister.errors import PersisterError
from persister.wire import PersistResponse

OnAnswer = Callable[[float, PersistResponse], None]
ABANDONED = "abandoned: unanswered when the phase ended"


class RequestSource:
    """The workload's requests, handed out in order per room.

    `take_ready` (closed loop) skips rooms with a request in flight;
    `take_next` (open loop) is strictly the global order. Both may be used
    on one source, one phase after the other.
    """

    def __init__(self, requests: Sequence[BenchRequest]) -> None:
        self._requests = requests
        self._rooms: dict[str, deque[int]] = {}
        for index, request in enumerate(requests):
            self._rooms.setdefault(request.room_id, deque()).append(index)
        self._taken = bytearray(len(requests))
        self._cursor = 0
        self._busy: set[str] = set()
        # (index of the room's next request, room) for rooms with nothing in
        # flight; entries go stale when take_next moves a room on.
        self._ready = [(queue[0], room) for room, queue in self._rooms.items()]
        heapq.heapify(self._ready)
        self.released = asyncio.Event()
        self.remaining = len(requests)

    def take_ready(self) -> BenchRequest | None:
        while self._ready:
            index, room = heapq.heappop(self._ready)
            queue = self._rooms[room]
            if room in self._busy or not queue or queue[0] != index:
                continue  # stale entry
            self._busy.add(room)
            return self._take(index)
        self.released.clear()
        return None

    def release(self, room_id: str) -> None:
        self._busy.discard(room_id)
        queue = self._rooms[room_id]
        if queue:
            heapq.heappush(self._ready, (queue[0], room_id))
        self.released.set()

    def take_next(self) -> BenchRequest | None:
        while self._cursor < len(self._requests) and self._taken[self._cursor]:
            self._cursor += 1
        if self._cursor >= len(self._requests):
            return None
        request = self._take(self._cursor)
        queue = self._rooms[request.room_id]
        if queue and request.room_id not in self._busy:
            heapq.heappush(self._ready, (queue[0], request.room_id))
        return request

    def _take(self, index: int) -> BenchRequest:
        request = self._requests[index]
        popped = self._rooms[request.room_id].popleft()
        assert popped == index, "a room's requests must leave in order"
        self._taken[index] = 1
        self.remaining -= 1
        return request


@dataclass
class StopRule:
    """A phase ends at its deadline or after `max_events` acknowledged events."""

    deadline: float
    max_events: int | None
    recorder: PhaseRecorder
    acknowledged: int = 0

    def done(self) -> bool:
        if time.perf_counter() >= self.deadline:
            return True
        return self.max_events is not None and self.acknowledged >= self.max_events


async def send(
    client: client_mod.PersisterClient,
    request: BenchRequest,
    intended: float,
    recorder: PhaseRecorder,
    on_answer: OnAnswer,
) -> int:
    """One persist call, recorded; returns the events acknowledged."""
    try:
        response = await client.persist(
            request.room_id, request.room_version, request.envelopes, request.backfilled
        )
    except PersisterError as exc:  # everything the client raises
        recorder.record_error(intended, time.perf_counter(), error_kind(exc))
        return 0
    done = time.perf_counter()
    results = response.results
    new = sum(not r.duplicate for r in results)
    recorder.record_ok(
        intended, done, [r.event_id for r in results], new, response.position.instance
    )
    on_answer(done, response)
    return len(results)


def error_kind(exc: PersisterError) -> str:
    """ "PersistUnavailable 503 M_LIMIT_EXCEEDED", say: class, status, errcode."""
    return f"{type(exc).__name__} {exc.status} {exc.errcode}"


async def run_closed(
    source: RequestSource,
    client: client_mod.PersisterClient,
    stop: StopRule,
    concurrency: int,
    on_answer: OnAnswer,
) -> None:
    await asyncio.gather(
        *(_closed_sender(source, client, stop, on_answer) for _ in range(concurrency))
    )


async def _closed_sender(
    source: RequestSource, client: client_mod.PersisterClient, stop: StopRule, on_answer: OnAnswer
) -> None:
    while not stop.done():
        request = source.take_ready()
        if request is None:
            if source.remaining == 0:
                return
            # Every room with work left has a request in flight: wait for one.
            await _wait_briefly(source.released)
            continue
        try:
            started = time.perf_counter()
            acknowledged = await send(client, request, started, stop.recorder, on_answer)
            stop.acknowledged += acknowledged  # not `+= await`: that reads before awaiting
        finally:
            source.release(request.room_id)


async def _wait_briefly(event: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=0.1)
    except TimeoutError:
        pass


async def run_open(
    source: RequestSource,
    client: client_mod.PersisterClient,
    stop: StopRule,
    rate: float,
    max_in_flight: int,
    on_answer: OnAnswer,
    rng: random.Random,
    drain_s: float,
) -> None:
    """Poisson arrivals at `rate` events/s (a request of K events weighs K)."""
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    intended = time.perf_counter()
    while not stop.done():
        request = source.take_next()
        if request is None:
            break
        intended += rng.expovariate(rate / len(request.events))
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # Waiting for a slot delays the send, never the intended time.
        await slots.acquire()
        task = asyncio.create_task(_open_send(client, request, intended, stop, on_answer, slots))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drain(tasks, drain_s)


async def _drain(tasks: set[asyncio.Task[None]], drain_s: float) -> None:
    """Let outstanding requests finish for `drain_s`, then abandon the rest.

    A room's queued requests wait for each other in the client, outside any
    per-call deadline, so without this an overloaded pool could hold the
    phase open for as long as its backlog takes.
    """
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _open_send(
    client: client_mod.PersisterClient,
    request: BenchRequest,
    intended: float,
    stop: StopRule,
    on_answer: OnAnswer,
    slots: asyncio.Semaphore,
) -> None:
    try:
        stop.recorder.record_send_delay(intended, time.perf_counter())
        acknowledged = await send(client, request, intended, stop.recorder, on_answer)
        stop.acknowledged += acknowledged  # not `+= await`: that reads before awaiting
    except asyncio.CancelledError:
        stop.recorder.record_error(intended, time.perf_counter(), ABANDONED)
        raise
    finally:
        slots.release()
