"""The client's HTTP requests to one persister, batched when they meet.

Every persist request costs an HTTP exchange on both sides whatever it
holds, and for single events that cost is most of the work. Requests for
*different* rooms that the client issues in the same turn of the event
loop (as happens when one commit answers many callers at once and they send
their next events) leave together as one request to the persister's batch
endpoint (`wire.BatchRequest`); each still gets its own answer, with its own
status, exactly as its room's endpoint would have given it. A request that
finds no other ready to go leaves alone, to its room's endpoint.

Requests also meet by waiting, but only when waiting costs them nothing: while
a persister has not answered a *small* exchange (under `small_exchange_bytes`),
later requests for it wait and leave together the moment it answers. That
persister is busy with the earlier request, and would only have queued them;
meanwhile, one exchange carrying many costs both sides far less than many
carrying one, and on a small machine that CPU is what sets the latency under
load. A request that finds nothing unanswered leaves at once, and waiting
requests that add up to `small_exchange_bytes` leave without waiting more: a
large exchange has paid for its HTTP, and holds no one back.

If a persister refuses a batch as a whole (for example one that predates the
endpoint answers 404), its requests are sent again, each alone: the batch
changed nothing, or changed what a resend reports as duplicates.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

import aiohttp
import msgspec
import yarl

from persister import wire

# What one exchange returns: status, Retry-After header (if any), body.
Answer = tuple[int, str | None, bytes]
# POSTs a body to a URL within a timeout; raises TimeoutError or aiohttp.ClientError.
Post = Callable[[yarl.URL, bytes, float], Awaitable[Answer]]
# Counts requests sent in a batch of several (first argument) and requests of
# batches refused as a whole (second).
OnBatch = Callable[[int, int], None]

Address = tuple[str, int]

# Above this, a persister would refuse the batch (persist.max_events_per_request
# caps the requests of a batch too); the rest wait for the next one.
DEFAULT_MAX_REQUESTS: Final = 256
DEFAULT_MAX_SMALL_EXCHANGES: Final = 1
DEFAULT_SMALL_EXCHANGE_BYTES: Final = 32 * 1024


class BatchRefused(Exception):
    """The persister did not take the batch as such: send the request alone."""


@functools.lru_cache(maxsize=4096)  # quoting and parsing cost ~7 µs a call
def persist_url(host: str, port: int, room_id: str) -> yarl.URL:
    # The room ID is percent-encoded as one path segment ("!" and ":" too),
    # and yarl is told so, lest it re-quote or normalise it.
    path = f"/_persist/v1/rooms/{quote(room_id, safe='')}/events"
    return yarl.URL(f"http://{_netloc(host)}:{port}{path}", encoded=True)


def batch_url(host: str, port: int) -> yarl.URL:
    return yarl.URL(f"http://{_netloc(host)}:{port}{wire.BATCH_PATH}", encoded=True)


def _netloc(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(slots=True, eq=False)
class _Request:
    room_id: str
    body: bytes
    timeout_s: float
    issued: float  # loop time
    grow: Callable[[], bytes] | None
    answer: asyncio.Future[Answer]

    def remaining_s(self, now: float) -> float:
        return self.timeout_s - (now - self.issued)


@dataclass(slots=True, eq=False)
class _Waiting:
    """The requests for one persister that have not left yet."""

    requests: list[_Request] = field(default_factory=list)
    size: int = 0
    due: bool = False  # a flush is scheduled


class Batcher:
    """Per persister address, the requests not sent yet, sent in batches."""

    def __init__(
        self,
        post: Post,
        on_batch: OnBatch,
        *,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        max_bytes: int = 1024 * 1024,
        max_small_exchanges: int = DEFAULT_MAX_SMALL_EXCHANGES,
        small_exchange_bytes: int = DEFAULT_SMALL_EXCHANGE_BYTES,
    ) -> None:
        self._post = post
        self._on_batch = on_batch
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._max_small_exchanges = max_small_exchanges
        self._small_exchange_bytes = small_exchange_bytes
        # Per address, the requests not sent yet, and the small exchanges unanswered.
        self._waiting: dict[Address, _Waiting] = {}
        self._small_in_flight: dict[Address, int] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def exchange(
        self,
        address: Address,
        room_id: str,
        body: bytes,
        timeout_s: float,
        grow: Callable[[], bytes] | None = None,
    ) -> Answer:
        """POST `body` for `room_id` to the persister at `address`, in a batch
        if others leave at the same moment; its answer, as its room's
        endpoint gives it. `grow`, if given, is asked for the body again
        when the request leaves: it may have taken in more of its room's
        events while it waited."""
        loop = asyncio.get_running_loop()
        request = _Request(room_id, body, timeout_s, loop.time(), grow, loop.create_future())
        waiting = self._waiting.get(address)
        if waiting is None:
            waiting = self._waiting[address] = _Waiting()
        waiting.requests.append(request)
        waiting.size += len(body)
        if not waiting.due and (
            not self._held_back(address) or waiting.size >= self._small_exchange_bytes
        ):
            waiting.due = True
            loop.call_soon(self._flush, address)
        try:
            # No timer of our own: the HTTP request carrying it gives up
            # within `timeout_s` (see `_send`), and a timer per request cost
            # a twentieth of a single-event client's CPU.
            return await request.answer
        except BatchRefused:
            remaining = request.remaining_s(loop.time())
            if remaining <= 0:
                raise TimeoutError from None
            return await self._post(persist_url(*address, room_id), request.body, remaining)
        finally:
            if not request.answer.done():
                # Cancelled: if it has not left yet it never will, and if it
                # has, nobody reads what comes back.
                request.answer.cancel()

    async def close(self) -> None:
        for waiting in self._waiting.values():
            for request in waiting.requests:
                request.answer.cancel()
        self._waiting.clear()
        for task in self._sending:
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)

    def _held_back(self, address: Address) -> bool:
        return 0 < self._max_small_exchanges <= self._small_in_flight.get(address, 0)

    def _flush(self, address: Address) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting.pop(address, None)
        if waiting is None:  # closed meanwhile
            return
        ready = []
        for request in waiting.requests:
            if request.answer.done():
                continue
            if request.remaining_s(now) <= 0:
                request.answer.set_exception(TimeoutError())
                continue
            if request.grow is not None:
                request.body = request.grow()
            ready.append(request)
        while ready:
            batch = _take(ready, self._max_requests, self._max_bytes)
            task = loop.create_task(self._send(address, batch, now))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            # Only small exchanges hold others back: a large one has already
            # paid for its HTTP, and must not delay small ones.
            if sum(len(r.body) for r in batch) < self._small_exchange_bytes:
                self._small_in_flight[address] = self._small_in_flight.get(address, 0) + 1
                task.add_done_callback(functools.partial(self._small_answered, address))

    def _small_answered(self, address: Address, _: asyncio.Task[None]) -> None:
        self._small_in_flight[address] -= 1
        waiting = self._waiting.get(address)
        if waiting is not None and not waiting.due and not self._held_back(address):
            # Not at once: the callers this exchange answered release their
            # rooms' next calls (and may send again) in the turns to come,
            # and those should leave with the requests that waited.
            waiting.due = True
            asyncio.get_running_loop().call_soon(self._flush, address)

    async def _send(self, address: Address, batch: list[_Request], now: float) -> None:
        try:
            if len(batch) == 1:
                request = batch[0]
                url = persist_url(*address, request.room_id)
                answers = [await self._post(url, request.body, request.remaining_s(now))]
            else:
                answers = await self._send_batch(address, batch, now)
        except asyncio.CancelledError:
            for request in batch:
                request.answer.cancel()
            raise
        except Exception as exc:  # every waiter must learn of it, not time out
            for request in batch:
                if not request.answer.done():
                    request.answer.set_exception(_fresh(exc))
            return
        for request, answer in zip(batch, answers, strict=True):
            if not request.answer.done():
                request.answer.set_result(answer)

    async def _send_batch(
        self, address: Address, batch: list[_Request], now: float
    ) -> list[Answer]:
        self._on_batch(len(batch), 0)
        body = wire.encoder.encode(
            wire.BatchRequest([wire.BatchItem(r.room_id, msgspec.Raw(r.body)) for r in batch])
        )
        # No longer than the least patient of them would wait: the others
        # retry with the rest of their time, as after any lost answer.
        timeout_s = min(r.remaining_s(now) for r in batch)
        status, _, payload = await self._post(batch_url(*address), body, timeout_s)
        try:
            if status != 200:
                raise BatchRefused(f"batch answered {status}")
            responses = wire.batch_response_decoder.decode(payload).responses
            if len(responses) != len(batch):
                raise BatchRefused(f"{len(responses)} answers for {len(batch)} requests")
        except (BatchRefused, msgspec.DecodeError) as exc:
            # Nothing, or only what a resend reports as duplicates, was written.
            self._on_batch(0, len(batch))
            raise BatchRefused(str(exc)) from None
        return [
            (a.status, None if a.retry_after_s is None else str(a.retry_after_s), bytes(a.body))
            for a in responses
        ]


def _take(ready: list[_Request], max_requests: int, max_bytes: int) -> list[_Request]:
    """Remove and return the first requests of `ready` that fit one batch
    (at least one, whatever its size)."""
    size = 0
    count = 0
    for request in ready:
        size += len(request.body)
        if count and (count >= max_requests or size > max_bytes):
            break
        count += 1
    taken = ready[:count]
    del ready[:count]
    return taken


def _fresh(exc: Exception) -> Exception:
    """An exception like `exc` for each waiter (one instance raised in many
    tasks would collect all their tracebacks)."""
    if isinstance(exc, TimeoutError):
        return TimeoutError()
    if isinstance(exc, BatchRefused):
        return BatchRefused(*exc.args)
    if isinstance(exc, aiohttp.ClientError):
        return aiohttp.ClientConnectionError(repr(exc))
    return exc  # a bug: let it show
