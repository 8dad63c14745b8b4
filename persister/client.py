"""The event creator's side of the persist API (contract sections 2, 3 and 7).

An event creator must send each room's events to the one persister that owns
the room, keep one room's requests in order, and ride out restarts and
saturation of persisters. Resending is always safe: persisting an event that
is already stored changes nothing and returns its original result with
`duplicate: true`, so a request whose answer was lost is simply sent again.

Everything this module raises is a `persister.errors.PersisterError`:

    ClientError                    carries room_id, status, errcode, error
    ├── PersistRejected            a 4xx other than 421: resending cannot help
    │   ├── InvalidRequest         400 (also a persister.errors.BadRequest)
    │   ├── AuthenticationFailed   401 (also a persister.errors.Unauthorized)
    │   └── RequestTooLarge        413 (also a persister.errors.BodyTooLarge)
    ├── UnknownOwner               a 421 named an instance missing from instance_map
    ├── ServerError                a 500, or an answer the client cannot read
    └── PersistUnavailable         the deadline passed while retrying
                                   (also a persister.errors.Unavailable)
    ShardMapUnavailable            no persister answered a shard-map read
                                   (a persister.errors.Unavailable)

Connection errors, timeouts, 503 (after its Retry-After) and the proxy
answers 429, 502 and 504 are retried with capped exponential backoff until
`ClientOptions.deadline_s`; a 421 is followed to the owner it names at once.
`status` is 0 when the last attempt got no HTTP answer at all (connection
refused or dropped, or a timeout).

Calls for a room that wait behind its request in flight leave together as
one request when their turn comes (`ClientOptions.coalesce_max_events`), and
each gets its own results; if that request is refused, each is sent alone.
Requests of different rooms that leave for one persister in the same turn
of the event loop share one HTTP request (`persister.batching`), each still
answered, retried and redirected on its own.

Routing follows the stored shard map (contract section 7): the client
places rooms by a `ShardMap` (epoch, writers, scheme, pins), seeded from
the config as epoch 0. It adopts newer epochs three ways: after a 421 it
reads the map from the persister that answered (`GET /_persist/v1/shard_map`,
in the background, while the request follows the owner the 421 named);
`follow_redis` applies SHARDMAP messages as they are published; and while
following, it also reads the map every `shard_map_poll_s`, for messages
lost to a Redis outage. Owners named by 421s are kept only until the next
epoch is adopted: the map then says the same or newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import aiohttp
import msgspec
import yarl
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from persister import errors, wire
from persister.batching import (
    DEFAULT_MAX_REQUESTS,
    DEFAULT_MAX_SMALL_EXCHANGES,
    DEFAULT_SMALL_EXCHANGE_BYTES,
    Answer,
    Batcher,
    persist_url,
)
from persister.config import Config
from persister.replication.publisher import redis_client
from persister.replication.shardmap import SHARD_MAP_PATH, decode_announcement
from persister.sharding import Scheme, ShardMap

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
EventLike = wire.EventEnvelope | Mapping[str, Any]

# Answers that mean "this persister cannot take the request right now".
# 502 and 504 come from a proxy in front of a restarting persister; 429 is
# what a rate-limiting proxy says. None of them means the request is wrong.
_RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

_error_decoder = msgspec.json.Decoder(wire.ErrorBody)
_shard_map_decoder = msgspec.json.Decoder(ShardMap)


# The least time worth starting an attempt with, before the deadline.
MIN_ATTEMPT_S: Final = 0.02


class ClientError(errors.PersisterError):
    """A persist call failed; `status`, `errcode` and `error` say how."""

    def __init__(self, room_id: str, status: int, errcode: str, error: str) -> None:
        # Only the message is passed on: the persister.errors classes mixed
        # in below agree on nothing else in their constructors.
        super().__init__(f"persisting into {room_id} failed: {status} {errcode}: {error}")
        self.room_id = room_id
        self.status = status
        self.errcode = errcode
        self.error = error


class PersistRejected(ClientError):
    """The persister refused the request itself; sending it again will not help."""


class InvalidRequest(PersistRejected, errors.BadRequest):
    pass


class AuthenticationFailed(PersistRejected, errors.Unauthorized):
    pass


class RequestTooLarge(PersistRejected, errors.BodyTooLarge):
    pass


class UnknownOwner(ClientError):
    """A 421 named an owner this client has no address for: update instance_map."""

    def __init__(self, room_id: str, owner: str) -> None:
        super().__init__(
            room_id, 421, "M_WRONG_SHARD", f"the owner {owner!r} is not in instance_map"
        )
        self.owner = owner


class ServerError(ClientError):
    """The persister failed or answered something outside the contract."""


class ShardMapUnavailable(errors.Unavailable):
    """No persister answered a request for the shard map."""


class _MapNotServed(Exception):
    """A persister answered the shard-map read with an error status."""


class PersistUnavailable(ClientError, errors.Unavailable):
    """No persister took the request before the deadline; the last failure is kept."""

    def __init__(
        self, room_id: str, status: int, errcode: str, error: str, *, attempts: int
    ) -> None:
        super().__init__(room_id, status, errcode, f"{error} (gave up after {attempts} attempts)")
        self.attempts = attempts
        self.retry_after_s = 0.0


_REJECTIONS: dict[int, type[PersistRejected]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    413: RequestTooLarge,
}


@dataclass(frozen=True, slots=True)
class ClientOptions:
    # One attempt; a request that takes longer is abandoned and resent.
    request_timeout_s: float = 10.0
    # Calls for a room that wait behind its request in flight leave together,
    # as one request of at most this many events and bytes (0: never).
    coalesce_max_events: int = 1000
    coalesce_max_bytes: int = 1024 * 1024
    # Requests for different rooms issued in the same turn of the event loop
    # go to their persister as one HTTP request of at most this many (and
    # coalesce_max_bytes), each answered as if alone (0 or 1: never).
    batch_max_requests: int = DEFAULT_MAX_REQUESTS
    # Requests for a persister that already has this many unanswered HTTP
    # requests of under small_exchange_bytes wait, and leave together when
    # one is answered or once they add up to small_exchange_bytes: the busy
    # persister would only have queued them, and one exchange carrying many
    # costs both sides far less than many carrying one (0: never wait).
    max_small_exchanges: int = DEFAULT_MAX_SMALL_EXCHANGES
    small_exchange_bytes: int = DEFAULT_SMALL_EXCHANGE_BYTES
    # The whole call, retries included, counted from when the room's earlier
    # requests are done (waiting for them is not this request's fault);
    # then PersistUnavailable.
    deadline_s: float = 60.0
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    connections_per_host: int = 32
    # Rooms whose owner was learned from a 421; the oldest are forgotten
    # first, which costs one more 421 for that room, nothing else.
    max_remembered_owners: int = 100_000
    # While following the map (`follow_redis`): read it from a persister this
    # often too, in case a SHARDMAP message was lost.
    shard_map_poll_s: float = 5.0
    # One shard-map read (it is small and the persister answers from memory
    # after one query).
    shard_map_timeout_s: float = 2.0


@dataclass(slots=True)
class ClientStats:
    """Counters for load harnesses; they only grow."""

    attempts: int = 0
    retries: int = 0
    redirects: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    unavailable: int = 0
    # Calls answered by a request that carried another call's events too.
    coalesced: int = 0
    # Requests of several calls refused as a whole: their calls went alone.
    coalesced_refused: int = 0
    # Requests sent in a batch with other rooms' (`persister.batching`), and
    # those of them refused as a whole (then each was sent alone).
    batched: int = 0
    batched_refused: int = 0

    def snapshot(self) -> ClientStats:
        return replace(self)


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    errcode: str
    error: str


@dataclass(frozen=True, slots=True)
class _Redirect:
    owner: str
    failure: _Failure
    by: str  # the instance that answered 421: its map is at least as new as the 421


@dataclass(frozen=True, slots=True)
class _Retry:
    failure: _Failure
    retry_after_s: float | None = None


_Outcome = wire.PersistResponse | _Redirect | _Retry


@dataclass(slots=True)
class _Call:
    """The retry state of one `persist` call."""

    room_id: str
    deadline: float
    backoff: _Backoff
    visited: set[str] = field(default_factory=set)
    attempts: int = 0
    last_failure: _Failure = _Failure(0, "M_UNKNOWN", "no attempt was made")

    def give_up(self) -> PersistUnavailable:
        f = self.last_failure
        return PersistUnavailable(
            self.room_id, f.status, f.errcode, f.error, attempts=self.attempts
        )


@dataclass(slots=True, eq=False)  # two calls are never the same, even with equal events
class _Waiting:
    """One `persist` call in its room's line."""

    room_version: str
    backfilled: bool
    events: Sequence[EventLike]
    body: bytes
    # Set when another call's request carried these events too.
    answer: asyncio.Future[wire.PersistResponse]
    # A request that carried it with others was refused (a 4xx or a 500
    # whose cause may be any of them): from then on it goes alone, so that
    # each call gets the answer its own events deserve.
    alone: bool = False


@dataclass(slots=True)
class _RoomSlot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    line: list[_Waiting] = field(default_factory=list)


class _RoomQueue:
    """One request in flight per room, the others waiting in call order.

    asyncio.Lock wakes waiters first-in first-out and never lets a newcomer
    overtake them, so holding it around the whole retry loop keeps a room's
    requests in the order `persist` was called, and `line` lists the calls
    in that order too. Slots are dropped when unused so that a long-lived
    client does not keep one per room ever seen.
    """

    def __init__(self) -> None:
        self._slots: dict[str, _RoomSlot] = {}

    async def enter(self, room_id: str, call: _Waiting) -> list[_Waiting]:
        """Wait for the room's earlier calls; the room's line (the list
        itself, which later calls join), `call` first. Every `enter` must be
        followed by `leave`, whatever happens (a `try`/`finally`: a plain
        pair of calls, as an async context manager cost a tenth of a
        single-event call's CPU)."""
        slot = self._slots.get(room_id)
        if slot is None:
            slot = self._slots[room_id] = _RoomSlot()
        slot.line.append(call)
        try:
            await slot.lock.acquire()
        except BaseException:
            self._drop(room_id, slot, call)
            raise
        return slot.line

    def leave(self, room_id: str, call: _Waiting) -> None:
        slot = self._slots[room_id]
        slot.lock.release()
        self._drop(room_id, slot, call)

    def _drop(self, room_id: str, slot: _RoomSlot, call: _Waiting) -> None:
        slot.line.remove(call)
        # Whoever carries it now answers nobody (no "never retrieved").
        call.answer.cancel()
        if not slot.line:
            del self._slots[room_id]


def _group(line: list[_Waiting], options: ClientOptions) -> list[_Waiting]:
    """The calls that can leave as one request: the first of `line` and
    those behind it, in order, until one differs, is done or would not fit."""
    first = line[0]
    group = [first]
    if first.alone:
        return group
    events, size = len(first.events), len(first.body)
    for call in line[1:]:
        events += len(call.events)
        size += len(call.body)
        if (
            call.alone
            or call.answer.done()
            or call.room_version != first.room_version
            or call.backfilled != first.backfilled
            or events > options.coalesce_max_events
            or size > options.coalesce_max_bytes
        ):
            break
        group.append(call)
    return group


@dataclass(slots=True, eq=False)
class _Outgoing:
    """The calls one request carries: the first of its room's line and,
    coalesced, those behind it (`_group`).

    Calls that join the line while the request waits to leave (behind an
    unanswered one, `persister.batching`, or a backoff) join it too, through
    `grow`, rather than wait for its answer and a request of their own. The
    request only ever grows by calls appended to it, so whatever an earlier
    attempt may have stored is a prefix of what the next one sends.
    """

    line: list[_Waiting]  # the room's line, live
    calls: list[_Waiting]
    body: bytes
    options: ClientOptions

    @classmethod
    def of(cls, line: list[_Waiting], options: ClientOptions) -> _Outgoing:
        outgoing = cls(line, [line[0]], line[0].body, options)
        outgoing.grow()
        return outgoing

    def grow(self) -> bytes:
        calls = _group(self.line, self.options)
        known = len(self.calls)
        if len(calls) > known and calls[:known] == self.calls:
            first = calls[0]
            events = [event for call in calls for event in call.events]
            self.calls = calls
            self.body = encode_request(first.room_version, events, first.backfilled)
        return self.body

    def events(self) -> int:
        return sum(len(call.events) for call in self.calls)


def _split(response: wire.PersistResponse, group: list[_Waiting]) -> list[wire.PersistResponse]:
    """One answer per call of a coalesced request; results come in event order."""
    answers = []
    start = 0
    for call in group:
        end = start + len(call.events)
        answers.append(wire.PersistResponse(response.results[start:end], response.position))
        start = end
    return answers


class _Backoff:
    """Capped exponential delays with "equal jitter".

    Half of each delay is fixed so that delays really grow; the random
    other half spreads clients that failed together (a persister restart)
    so they do not come back in one burst.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._max_s, self._initial_s * 2.0 ** min(self._failures, 60))
        self._failures += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until_http_date(value, now or datetime.now(UTC))
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _seconds_until_http_date(value: str, now: datetime) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - now).total_seconds()


def encode_request(
    room_version: str, events: Sequence[EventLike], backfilled: bool = False
) -> bytes:
    body = {"room_version": room_version, "backfilled": backfilled, "events": list(events)}
    return wire.encoder.encode(body)


def shard_map_url(host: str, port: int) -> yarl.URL:
    netloc = f"[{host}]" if ":" in host else host
    return yarl.URL(f"http://{netloc}:{port}{SHARD_MAP_PATH}", encoded=True)


class PersisterClient:
    """Sends events to the persister owning their room, in order, with retries.

    Requests for one room go one at a time in call order (calls waiting
    behind one in flight leave together); different rooms go concurrently
    over one pooled session. If a call fails, later calls for
    the same room still proceed: whether to continue is the caller's choice.
    Results may say `duplicate: true` for events that an earlier, timed-out
    attempt of the same call had already stored.
    """

    def __init__(
        self,
        writers: Sequence[str],
        instance_map: Mapping[str, tuple[str, int]],
        secret: str,
        *,
        options: ClientOptions | None = None,
        sharding: Scheme = "sha256",
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """`writers` and `sharding` seed the map (epoch 0) until a stored one is learned."""
        self._options = options or ClientOptions()
        self._rng = rng or random.Random()
        self._sleep = sleep  # tests replace it to observe the delays
        self._headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        self._map = ShardMap(0, (), sharding)
        self._instances: dict[str, tuple[str, int]] = {}
        self._learned: dict[str, str] = {}
        self._rooms = _RoomQueue()
        self._http: aiohttp.ClientSession | None = None
        self._batcher = Batcher(
            self._post,
            self._count_batch,
            max_requests=self._options.batch_max_requests,
            max_bytes=self._options.coalesce_max_bytes,
            max_small_exchanges=self._options.max_small_exchanges,
            small_exchange_bytes=self._options.small_exchange_bytes,
        )
        self._closed = False
        self._map_read: asyncio.Task[ShardMap] | None = None
        self._adopted = asyncio.Event()  # set (and replaced) when a newer map is adopted
        self._followers: list[asyncio.Task[None]] = []
        self._next_map_source = 0
        self.stats = ClientStats()
        self.set_writers(writers, instance_map)

    @classmethod
    def from_config(
        cls, config: Config, *, options: ClientOptions | None = None
    ) -> PersisterClient:
        instance_map = {name: (loc.host, loc.port) for name, loc in config.instance_map.items()}
        return cls(
            config.stream_writers.events,
            instance_map,
            config.secret(),
            options=options,
            sharding=config.sharding,
        )

    # -- routing -------------------------------------------------------

    def set_writers(
        self,
        writers: Sequence[str],
        instance_map: Mapping[str, tuple[str, int]] | None = None,
    ) -> None:
        """Replace the writer list by hand, keeping epoch, scheme and pins;
        owners learned from 421s are dropped. A newer stored map still wins."""
        instances = dict(self._instances if instance_map is None else instance_map)
        if not writers:
            raise ValueError("the writer list must name at least one persister")
        missing = [w for w in writers if w not in instances]
        if missing:
            raise ValueError(f"writers {missing} have no address in instance_map")
        self._map = msgspec.structs.replace(self._map, writers=tuple(writers))
        self._instances = instances
        self._learned.clear()

    def set_shard_map(self, shard_map: ShardMap) -> bool:
        """Route by `shard_map` if it is newer than ours; True if adopted."""
        if shard_map.epoch <= self._map.epoch:
            return False
        unknown = sorted(w for w in shard_map.all_writers() if w not in self._instances)
        if unknown:
            # Rooms they own raise UnknownOwner until instance_map names them.
            logger.warning("shard map epoch %d names writers without address: %s",
                           shard_map.epoch, ", ".join(unknown))  # fmt: skip
        self._map = shard_map
        self._learned.clear()  # the map now says the same as the 421s did, or newer
        self._adopted.set()
        self._adopted = asyncio.Event()
        logger.info("client routes by shard map epoch %d", shard_map.epoch)
        return True

    def owner_of(self, room_id: str) -> str:
        """The instance this client will send the room's next request to."""
        return self._learned.get(room_id) or self._map.owner(room_id)

    def remember_owner(self, room_id: str, owner: str) -> None:
        """Record an owner named by a 421 (a newer map than ours), until the
        next epoch is adopted."""
        self._learned.pop(room_id, None)
        if owner == self._map.owner(room_id):
            return
        if len(self._learned) >= self._options.max_remembered_owners:
            del self._learned[next(iter(self._learned))]  # the oldest entry
        self._learned[room_id] = owner

    @property
    def shard_map(self) -> ShardMap:
        return self._map

    @property
    def writers(self) -> tuple[str, ...]:
        return self._map.writers

    @property
    def remembered_owners(self) -> int:
        return len(self._learned)

    # -- persisting ----------------------------------------------------

    async def persist(
        self,
        room_id: str,
        room_version: str,
        events: Sequence[EventLike],
        backfilled: bool = False,
    ) -> wire.PersistResponse:
        body = encode_request(room_version, events, backfilled)
        future: asyncio.Future[wire.PersistResponse] = asyncio.get_running_loop().create_future()
        call = _Waiting(room_version, backfilled, events, body, future)
        line = await self._rooms.enter(room_id, call)
        try:
            assert line[0] is call, "a room's calls take their turns in order"
            if call.answer.done():
                self.stats.coalesced += 1
                return call.answer.result()
            return await self._send_coalesced(room_id, _Outgoing.of(line, self._options))
        finally:
            self._rooms.leave(room_id, call)

    async def _send_coalesced(self, room_id: str, outgoing: _Outgoing) -> wire.PersistResponse:
        """Send the events of the calls `outgoing` carries as one request (the
        first call's), and answer the others: they then find their answer
        when their turn comes, without a request of their own.

        The request is atomic, so they all commit or none does, as if sent
        one after the other with no failure. If it is refused, nothing was
        written and no call can be told which event was at fault: each call
        then goes alone, this one at once, the others at their turn. A
        failure that concerns the room, not its events (the deadline, an
        unknown owner), is every call's.
        """
        try:
            response = await self._send(room_id, outgoing)
        except (PersistRejected, ServerError):
            if len(outgoing.calls) == 1:
                raise
            self.stats.coalesced_refused += 1
            for call in outgoing.calls:
                call.alone = True
            first = outgoing.calls[0]
            return await self._send(room_id, _Outgoing([first], [first], first.body, self._options))
        except ClientError as exc:
            for call in outgoing.calls[1:]:
                if not call.answer.done():
                    call.answer.set_exception(_copy_of(exc))
            raise
        group = outgoing.calls
        if len(response.results) != outgoing.events():
            raise ServerError(
                room_id, 200, "M_BAD_ANSWER",
                f"{len(response.results)} results for {outgoing.events()} events",
            )  # fmt: skip
        if len(group) == 1:
            return response
        answers = _split(response, group)
        for call, answer in zip(group[1:], answers[1:], strict=True):
            if not call.answer.done():
                call.answer.set_result(answer)
        return answers[0]

    async def _send(self, room_id: str, outgoing: _Outgoing) -> wire.PersistResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.deadline_s
        owner = self.owner_of(room_id)
        outcome = await self._attempt(owner, room_id, outgoing, self._options.deadline_s)
        if isinstance(outcome, wire.PersistResponse):
            return outcome
        # Retry state only for the calls that need it: most never do.
        backoff = _Backoff(self._options.backoff_initial_s, self._options.backoff_max_s, self._rng)
        call = _Call(room_id, deadline, backoff, visited={owner}, attempts=1)
        while True:
            call.last_failure = outcome.failure
            delay = self._delay_after(call, outcome)
            await self._pause(call, delay)
            owner = self.owner_of(room_id)
            call.visited.add(owner)
            call.attempts += 1
            outcome = await self._attempt(owner, room_id, outgoing, call.deadline - loop.time())
            if isinstance(outcome, wire.PersistResponse):
                return outcome

    def _delay_after(self, call: _Call, outcome: _Redirect | _Retry) -> float:
        if isinstance(outcome, _Redirect):
            self.stats.redirects += 1
            self.remember_owner(call.room_id, outcome.owner)
            # Most likely a new epoch: learn it for every room, not just this one.
            self._read_map_soon(outcome.by)
            if outcome.owner not in call.visited:
                return 0.0  # follow it at once
            # Instances disagree on the owner, as they may while a reshard
            # takes effect: give them time to settle.
            call.visited.clear()
            return call.backoff.next_delay()
        ladder = call.backoff.next_delay()  # climbs even when the server sets the pace
        if outcome.retry_after_s is None:
            return ladder
        # Never sooner than asked; up to 10% later so refused clients spread out.
        return outcome.retry_after_s * (1 + self._rng.uniform(0, 0.1))

    async def _pause(self, call: _Call, delay: float) -> None:
        # An attempt left with less than MIN_ATTEMPT_S could only time out,
        # and its timeout would hide the failure that matters (a 421, a 503).
        if asyncio.get_running_loop().time() + delay + MIN_ATTEMPT_S >= call.deadline:
            raise call.give_up()
        if delay == 0:
            return
        self.stats.retries += 1
        logger.debug("retrying room=%s in %.3fs after %s", call.room_id, delay, call.last_failure)
        await self._sleep_unless_moved(call.room_id, delay)

    async def _sleep_unless_moved(self, room_id: str, delay: float) -> None:
        """Sleep `delay`, or only until a newer map gives the room another
        owner: a room moved off a dead persister need not sit out a backoff
        that the dead one earned."""
        owner = self.owner_of(room_id)
        sleeper = asyncio.ensure_future(self._sleep(delay))
        try:
            while not sleeper.done():  # one round per map adopted meanwhile
                adopted = asyncio.ensure_future(self._adopted.wait())
                await asyncio.wait({sleeper, adopted}, return_when=asyncio.FIRST_COMPLETED)
                adopted.cancel()
                if not sleeper.done() and self.owner_of(room_id) != owner:
                    return
            await sleeper  # its exception, if any
        finally:
            sleeper.cancel()

    async def _attempt(
        self, owner: str, room_id: str, outgoing: _Outgoing, budget_s: float
    ) -> _Outcome:
        host, port = self._instances[owner]
        timeout_s = min(self._options.request_timeout_s, budget_s)
        self.stats.attempts += 1
        try:
            if self._options.batch_max_requests > 1:
                # It grows when it leaves, not now: it may wait to leave.
                answer = await self._batcher.exchange(
                    (host, port), room_id, outgoing.body, timeout_s, outgoing.grow
                )
            else:
                url = persist_url(host, port, room_id)
                answer = await self._post(url, outgoing.grow(), timeout_s)
        except TimeoutError:
            self.stats.timeouts += 1
            return _Retry(_Failure(0, "M_TIMEOUT", f"{owner} did not answer in {timeout_s}s"))
        except aiohttp.ClientError as exc:
            # Refused, reset, or dropped before the whole answer arrived: the
            # request may or may not have been committed, and resending is
            # safe either way.
            self.stats.connection_errors += 1
            return _Retry(_Failure(0, "M_CONNECTION", f"{owner}: {exc!r}"))
        return self._interpret(owner, room_id, *answer)

    def _count_batch(self, sent: int, refused: int) -> None:
        self.stats.batched += sent
        self.stats.batched_refused += refused

    async def _post(self, url: yarl.URL, body: bytes, timeout_s: float) -> Answer:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        # aiohttp raises a ResourceWarning for bytes over its limit (1 MiB; an
        # exception where warnings are errors) and takes a file-like object without one.
        large = len(body) > aiohttp.payload.TOO_LARGE_BYTES_BODY
        data: bytes | io.BytesIO = io.BytesIO(body) if large else body
        async with self._session().post(
            url, data=data, headers=self._headers, timeout=timeout
        ) as answer:
            return answer.status, answer.headers.get("Retry-After"), await answer.read()

    def _interpret(
        self, owner: str, room_id: str, status: int, retry_after: str | None, payload: bytes
    ) -> _Outcome:
        if status == 200:
            return self._decode_success(owner, room_id, payload)
        body = _decode_error(payload)
        failure = _Failure(status, body.errcode, f"{owner}: {body.error}")
        if status == 421:
            return self._redirect(owner, room_id, body, failure)
        if status in _RETRYABLE_STATUSES:
            self.stats.unavailable += 1
            return _Retry(failure, parse_retry_after(retry_after))
        raise _failure_exception(room_id, failure)

    def _decode_success(self, owner: str, room_id: str, payload: bytes) -> wire.PersistResponse:
        try:
            return wire.response_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise ServerError(room_id, 200, "M_BAD_ANSWER", f"{owner}: {exc}") from None

    def _redirect(
        self, by: str, room_id: str, body: wire.ErrorBody, failure: _Failure
    ) -> _Redirect:
        if body.owner is None:
            raise ServerError(room_id, 421, body.errcode, f"{failure.error} (no owner named)")
        if body.owner not in self._instances:
            raise UnknownOwner(room_id, body.owner)
        return _Redirect(body.owner, failure, by)

    # -- following the shard map -------------------------------------------

    async def refresh_shard_map(self, source: str | None = None) -> ShardMap:
        """Read the stored map from a persister (`source` first, then the
        others of our map in turn) and adopt it if newer; the map routed by.

        Concurrent calls share one read. Raises ShardMapUnavailable when no
        persister answers.
        """
        if self._map_read is None or self._map_read.done():
            self._map_read = asyncio.create_task(self._read_map(source))
        fetched = await asyncio.shield(self._map_read)
        self.set_shard_map(fetched)
        return self._map

    async def follow_redis(self, redis_url: str, channel: str) -> None:
        """Adopt every SHARDMAP announced on `channel`, and read the map every
        `shard_map_poll_s` besides; both run until `close`."""
        if self._closed:
            raise RuntimeError("the PersisterClient is closed")
        self._followers += [
            asyncio.create_task(self._listen(redis_url, channel), name="client-shardmap-redis"),
            asyncio.create_task(self._poll_map(), name="client-shardmap-poll"),
        ]

    def _read_map_soon(self, source: str | None) -> None:
        """Start a background read of the map unless one is under way."""
        if self._closed or (self._map_read is not None and not self._map_read.done()):
            return
        self._map_read = asyncio.create_task(self._read_map(source))
        self._map_read.add_done_callback(self._adopt_read)

    def _adopt_read(self, task: asyncio.Task[ShardMap]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.debug("reading the shard map after a 421 failed: %s", error)
            return
        self.set_shard_map(task.result())

    async def _read_map(self, source: str | None) -> ShardMap:
        candidates = sorted(self._map.all_writers() & self._instances.keys())
        if source is not None and source in self._instances:
            candidates = [source] + [c for c in candidates if c != source]
        else:
            # Spread polls over the pool rather than always asking the first.
            turn = self._next_map_source % max(1, len(candidates))
            candidates = candidates[turn:] + candidates[:turn]
            self._next_map_source += 1
        failures = []
        for instance in candidates:  # each at most once
            try:
                return await self._read_map_from(instance)
            except (_MapNotServed, aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
                failures.append(f"{instance}: {exc!r}")
        raise ShardMapUnavailable("no persister answered for the shard map: " + "; ".join(failures))

    async def _read_map_from(self, instance: str) -> ShardMap:
        host, port = self._instances[instance]
        timeout = aiohttp.ClientTimeout(total=self._options.shard_map_timeout_s)
        async with self._session().get(
            shard_map_url(host, port), headers=self._headers, timeout=timeout
        ) as answer:
            payload = await answer.read()
            if answer.status != 200:
                raise _MapNotServed(f"{answer.status} {_decode_error(payload).error}")
        return _shard_map_decoder.decode(payload)

    async def _poll_map(self) -> None:
        while True:
            await asyncio.sleep(self._options.shard_map_poll_s)
            try:
                await self.refresh_shard_map()
            except ShardMapUnavailable as exc:
                logger.warning("cannot poll the shard map: %s", exc)

    async def _listen(self, redis_url: str, channel: str) -> None:
        """SHARDMAP messages, resubscribing after any failure; runs until cancelled."""
        delay = 0.05
        while True:
            client = redis_client(redis_url, "persister-client-shardmap", reconnects=0)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(channel)
                delay = 0.05
                await self._pump(pubsub)
            except (RedisError, OSError) as exc:
                logger.warning("client: SHARDMAP subscription lost (%s); resubscribing", exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _pump(self, pubsub: PubSub) -> None:
        while not self._closed:  # see StreamReader._pump
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                await pubsub.ping()  # a half-open connection shows as an error here
                continue
            if message.get("type") == "subscribe":
                # Announcements made while we were not subscribed are lost.
                self._read_map_soon(None)
            elif message.get("type") == "message" and b"SHARDMAP" in message["data"]:
                # The channel mostly carries positions and rows: the substring
                # test spares decoding them.
                announced = decode_announcement(message["data"])
                if announced is not None and announced.in_force:
                    self.set_shard_map(announced.shard_map())

    # -- lifecycle -----------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            if self._closed:
                raise RuntimeError("the PersisterClient is closed")
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=self._options.connections_per_host
            )
            self._http = aiohttp.ClientSession(connector=connector)
        return self._http

    async def close(self) -> None:
        self._closed = True
        await self._batcher.close()
        tasks = [*self._followers, *([self._map_read] if self._map_read else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._followers.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> PersisterClient:
        self._session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _decode_error(payload: bytes) -> wire.ErrorBody:
    try:
        return _error_decoder.decode(payload)
    except msgspec.DecodeError:
        # Not ours (a proxy's HTML page, say): keep a readable excerpt.
        text = payload[:200].decode("utf-8", "replace").strip()
        return wire.ErrorBody(errcode="M_UNKNOWN", error=text or "(empty body)")


def _copy_of(exc: ClientError) -> ClientError:
    """The same failure as a new exception, for another caller to raise."""
    copy = type(exc).__new__(type(exc))  # its own __init__ signature varies
    copy.args = exc.args
    copy.__dict__.update(exc.__dict__)
    return copy


def _failure_exception(room_id: str, failure: _Failure) -> ClientError:
    args = (room_id, failure.status, failure.errcode, failure.error)
    if failure.status in _REJECTIONS:
        return _REJECTIONS[failure.status](*args)
    if 400 <= failure.status < 500:
        return PersistRejected(*args)
    # A 500 is a persister bug ("never a 500 for bad input"); resending
    # would only hide it until the deadline.
    return ServerError(*args)
