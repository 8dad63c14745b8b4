"""PersisterClient against small stand-in persisters that misbehave on cue.

Each `FakePersister` is a real aiohttp server on a free port. Its `behave`
hook decides every answer, so a test can script 421s, 503s, slow answers
and dropped connections, and then read `arrivals` to see what was sent.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import msgspec
import pytest
from aiohttp import web

from persister import errors, wire
from persister.client import (
    AuthenticationFailed,
    ClientOptions,
    InvalidRequest,
    PersisterClient,
    PersistRejected,
    PersistUnavailable,
    RequestTooLarge,
    ServerError,
    UnknownOwner,
    parse_retry_after,
)

# Owners by the sha256 rule with two writers (see tests/unit/test_client_routing.py).
ROOM_OF_W0 = "!abc:example.org"
ROOM_OF_W1 = "!room1:example.org"
ANOTHER_ROOM_OF_W0 = "!room3:example.org"
SECRET = "s3cret"

Body = dict[str, Any]
Behaviour = Callable[["FakePersister", web.Request, str, Body], Awaitable[web.StreamResponse]]


class Arrival(msgspec.Struct):
    room_id: str
    body: Body
    authorization: str | None


class FakePersister:
    def __init__(self, name: str) -> None:
        self.name = name
        self.arrivals: list[Arrival] = []
        self.behave: Behaviour = answer_ok
        self.in_flight: dict[str, int] = {}
        self.max_in_flight_per_room = 0
        self.next_ordering = 1
        self.port = 0
        # Rooms of each batch request (`persister.batching`); False: 404 to them.
        self.batches: list[list[str]] = []
        self.takes_batches = True
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)  # as a persister's default
        app.router.add_post("/_persist/v1/rooms/{room_id}/events", self._handle)
        app.router.add_post(wire.BATCH_PATH, self._handle_batch)
        # A handler a test left sleeping must not hold the teardown for long.
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def rooms_seen(self) -> list[str]:
        return [a.room_id for a in self.arrivals]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        room_id = request.match_info["room_id"]
        return await self._answer(request, room_id, json.loads(await request.read()))

    async def _answer(self, request: web.Request, room_id: str, body: Body) -> web.StreamResponse:
        self.arrivals.append(Arrival(room_id, body, request.headers.get("Authorization")))
        self.in_flight[room_id] = self.in_flight.get(room_id, 0) + 1
        self.max_in_flight_per_room = max(self.max_in_flight_per_room, self.in_flight[room_id])
        try:
            return await self.behave(self, request, room_id, body)
        finally:
            self.in_flight[room_id] -= 1

    async def _handle_batch(self, request: web.Request) -> web.StreamResponse:
        """Each request of the batch is answered by `behave`, as if alone."""
        if not self.takes_batches:
            raise web.HTTPNotFound()
        items = json.loads(await request.read())["requests"]
        self.batches.append([item["room_id"] for item in items])
        answers = await asyncio.gather(
            *(self._answer(request, item["room_id"], item["request"]) for item in items)
        )
        return web.json_response({"responses": [_batch_answer(a) for a in answers]})


def _batch_answer(response: web.StreamResponse) -> Body:
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    answer: Body = {"status": response.status, "body": json.loads(response.body)}
    if (retry_after := response.headers.get("Retry-After")) is not None:
        answer["retry_after_s"] = int(float(retry_after))
    return answer


async def answer_ok(
    fake: FakePersister, request: web.Request, room_id: str, body: Body
) -> web.Response:
    results = []
    for i, envelope in enumerate(body["events"]):
        event_id = envelope.get("event_id") or f"$generated{i}"
        results.append(
            {"event_id": event_id, "stream_ordering": fake.next_ordering, "depth": i + 1,
             "duplicate": False}
        )  # fmt: skip
        fake.next_ordering += 1
    position = {"instance": fake.name, "stream_id": fake.next_ordering - 1}
    return web.json_response({"results": results, "position": position})


def answer_error(status: int, errcode: str, error: str, **extra: str) -> Behaviour:
    async def behave(fake, request, room_id, body):
        return web.json_response({"errcode": errcode, "error": error, **extra}, status=status)

    return behave


def misdirect_to(owner: str) -> Behaviour:
    return answer_error(421, "M_WRONG_SHARD", "not mine", owner=owner)


def unavailable(retry_after: str | None) -> Behaviour:
    async def behave(fake, request, room_id, body):
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        return web.json_response(
            {"errcode": "M_LIMIT_EXCEEDED", "error": "queues full"}, status=503, headers=headers
        )

    return behave


def first_then(first: Behaviour, times: int = 1, then: Behaviour = answer_ok) -> Behaviour:
    remaining = [times]

    async def behave(fake, request, room_id, body):
        if remaining[0] > 0:
            remaining[0] -= 1
            return await first(fake, request, room_id, body)
        return await then(fake, request, room_id, body)

    return behave


async def drop_connection(
    fake: FakePersister, request: web.Request, room_id: str, body: Body
) -> web.Response:
    assert request.transport is not None
    request.transport.close()
    return web.Response()


def slow(seconds: float) -> Behaviour:
    async def behave(fake, request, room_id, body):
        await asyncio.sleep(seconds)
        return await answer_ok(fake, request, room_id, body)

    return behave


def event(n: int) -> Body:
    return {"pdu": {"type": "m.room.message", "content": {"n": n}}, "event_id": f"$e{n}"}


@pytest.fixture
async def fakes():
    started = [FakePersister("w0"), FakePersister("w1"), FakePersister("w2")]
    for fake in started:
        await fake.start()
    yield started
    for fake in started:
        await fake.stop()


FAST = ClientOptions(
    request_timeout_s=2.0, deadline_s=5.0, backoff_initial_s=0.01, backoff_max_s=0.05
)


def make_client(
    fakes: list[FakePersister],
    options: ClientOptions = FAST,
    writers: Sequence[str] = ("w0", "w1"),
    **kwargs: Any,
) -> PersisterClient:
    instance_map = {f.name: ("127.0.0.1", f.port) for f in fakes}
    return PersisterClient(
        list(writers), instance_map, SECRET, options=options, rng=random.Random(7), **kwargs
    )


# -- the request itself --------------------------------------------------------


async def test_request_goes_to_room_owner_with_bearer_secret_and_contract_body(fakes):
    w0, w1, _ = fakes
    async with make_client(fakes) as client:
        answer = await client.persist(ROOM_OF_W1, "10", [event(1), event(2)], backfilled=True)
    assert w0.arrivals == []
    [arrival] = w1.arrivals
    assert arrival.room_id == ROOM_OF_W1
    assert arrival.authorization == f"Bearer {SECRET}"
    assert arrival.body == {
        "room_version": "10",
        "backfilled": True,
        "events": [event(1), event(2)],
    }
    assert [r.event_id for r in answer.results] == ["$e1", "$e2"]
    assert answer.position == wire.Position("w1", 2)


async def test_a_request_over_a_mebibyte_is_sent_whole_and_warns_of_nothing(fakes):
    # The suite turns warnings into errors: aiohttp's ResourceWarning for large bytes would fail it.
    big = [{"pdu": {"type": "m.room.message", "body": "x" * 60_000}, "event_id": f"$e{n}"}
           for n in range(20)]  # fmt: skip
    async with make_client(fakes) as client:
        answer = await client.persist(ROOM_OF_W0, "10", big)
    assert len(answer.results) == 20
    assert fakes[0].arrivals[0].body["events"] == big


async def test_wire_envelopes_are_sent_like_dicts(fakes):
    envelope = wire.EventEnvelope(pdu=msgspec.Raw(b'{"type":"m.room.create"}'), outlier=True)
    async with make_client(fakes) as client:
        await client.persist(ROOM_OF_W0, "12", [envelope])
    sent = fakes[0].arrivals[0].body["events"][0]
    assert sent["pdu"] == {"type": "m.room.create"}
    assert sent["outlier"] is True


async def test_room_id_with_reserved_characters_reaches_server_intact(fakes):
    room = "!a/b?c#d%e:example.org"
    async with make_client(fakes, writers=["w0"]) as client:
        await client.persist(room, "10", [event(1)])
    assert fakes[0].rooms_seen() == [room]


# -- 421: following the owner ------------------------------------------------------


async def test_421_is_followed_at_once_to_the_named_owner(fakes):
    w0, _, w2 = fakes
    w0.behave = misdirect_to("w2")
    async with make_client(fakes, sleep=fail_if_called) as client:
        answer = await client.persist(ROOM_OF_W0, "10", [event(1)])
        assert answer.position.instance == "w2"
        assert client.stats.redirects == 1
        assert client.stats.retries == 0


async def fail_if_called(seconds: float) -> None:
    raise AssertionError(f"slept {seconds}s where no wait was due")


async def test_owner_learned_from_421_is_used_for_later_requests_of_that_room_only(fakes):
    w0, _, w2 = fakes
    w0.behave = first_then(misdirect_to("w2"))
    async with make_client(fakes) as client:
        await client.persist(ROOM_OF_W0, "10", [event(1)])
        await client.persist(ROOM_OF_W0, "10", [event(2)])
        await client.persist(ANOTHER_ROOM_OF_W0, "10", [event(3)])
        assert client.owner_of(ROOM_OF_W0) == "w2"
    assert w0.rooms_seen() == [ROOM_OF_W0, ANOTHER_ROOM_OF_W0]
    assert w2.rooms_seen() == [ROOM_OF_W0, ROOM_OF_W0]


async def test_421_ping_pong_between_instances_waits_then_gives_up_at_the_deadline(fakes):
    w0, w1, _ = fakes
    w0.behave = misdirect_to("w1")
    w1.behave = misdirect_to("w0")
    options = ClientOptions(deadline_s=0.3, backoff_initial_s=0.02, backoff_max_s=0.05)
    async with make_client(fakes, options=options) as client:
        with pytest.raises(PersistUnavailable) as caught:
            await client.persist(ROOM_OF_W0, "10", [event(1)])
        assert client.stats.retries >= 2  # it paused between rounds rather than spinning
        assert client.stats.redirects < 60
    assert caught.value.status == 421
    assert caught.value.errcode == "M_WRONG_SHARD"


async def test_421_naming_an_instance_without_address_raises_unknown_owner(fakes):
    fakes[0].behave = misdirect_to("w9")
    async with make_client(fakes) as client:
        with pytest.raises(UnknownOwner) as caught:
            await client.persist(ROOM_OF_W0, "10", [event(1)])
    assert caught.value.owner == "w9"
    assert caught.value.status == 421


async def test_421_without_owner_is_a_server_error(fakes):
    fakes[0].behave = answer_error(421, "M_WRONG_SHARD", "not mine")
    async with make_client(fakes) as client:
        with pytest.raises(ServerError):
            await client.persist(ROOM_OF_W0, "10", [event(1)])


# -- 503, timeouts, dropped connections: retrying ----------------------------------


async def test_503_is_retried_no_sooner_than_retry_after(fakes):
    fakes[0].behave = first_then(unavailable("0.3"))
    async with make_client(fakes) as client:
        started = time.monotonic()
        await client.persist(ROOM_OF_W0, "10", [event(1)])
        elapsed = time.monotonic() - started
        assert client.stats.retries == 1
        assert client.stats.unavailable == 1
    assert 0.3 <= elapsed < 2.0
    assert len(fakes[0].arrivals) == 2


async def test_retry_after_as_http_date_is_honoured(fakes):
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    in_three_seconds = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3))
    fakes[0].behave = first_then(unavailable(in_three_seconds))
    async with make_client(fakes, sleep=record) as client:
        await client.persist(ROOM_OF_W0, "10", [event(1)])
    [delay] = sleeps
    assert 1.5 < delay < 3.5


async def test_503_without_retry_after_backs_off_exponentially_with_jitter_up_to_the_cap(fakes):
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    fakes[0].behave = first_then(unavailable(None), times=6)
    options = ClientOptions(backoff_initial_s=0.1, backoff_max_s=0.8, deadline_s=30)
    async with make_client(fakes, options=options, sleep=record) as client:
        await client.persist(ROOM_OF_W0, "10", [event(1)])
    ceilings = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    assert len(sleeps) == len(ceilings)
    for delay, ceiling in zip(sleeps, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(sleeps[3:])) == 3  # jittered, not one fixed value


async def test_dropped_connection_is_retried_and_the_answer_returned(fakes):
    fakes[0].behave = first_then(drop_connection)
    async with make_client(fakes) as client:
        answer = await client.persist(ROOM_OF_W0, "10", [event(1)])
        assert client.stats.connection_errors == 1
        assert client.stats.retries == 1
    assert [r.event_id for r in answer.results] == ["$e1"]
    assert len(fakes[0].arrivals) == 2


async def test_refused_connection_is_retried_until_the_persister_comes_back(fakes):
    w0 = fakes[0]
    await w0.stop()  # keeps its port: the client still knows it

    async def restart_later() -> None:
        await asyncio.sleep(0.3)
        await w0.start()

    async with make_client(fakes) as client:
        restarting = asyncio.create_task(restart_later())
        answer = await client.persist(ROOM_OF_W0, "10", [event(1)])
        await restarting
        assert client.stats.connection_errors >= 2
    assert answer.position.instance == "w0"


async def test_slow_answer_is_abandoned_after_request_timeout_and_resent(fakes):
    fakes[0].behave = first_then(slow(3.0))
    options = ClientOptions(request_timeout_s=0.2, deadline_s=5, backoff_initial_s=0.01)
    async with make_client(fakes, options=options) as client:
        started = time.monotonic()
        await client.persist(ROOM_OF_W0, "10", [event(1)])
        assert client.stats.timeouts == 1
    assert time.monotonic() - started < 2.0  # not the 3s of the slow answer
    assert len(fakes[0].arrivals) == 2


async def test_retrying_stops_at_the_deadline_with_the_last_failure(fakes):
    fakes[0].behave = unavailable("0.05")
    options = ClientOptions(deadline_s=0.4, backoff_initial_s=0.01)
    async with make_client(fakes, options=options) as client:
        started = time.monotonic()
        with pytest.raises(PersistUnavailable) as caught:
            await client.persist(ROOM_OF_W0, "10", [event(1)])
    assert time.monotonic() - started < 1.5
    failure = caught.value
    assert (failure.status, failure.errcode) == (503, "M_LIMIT_EXCEEDED")
    assert "queues full" in failure.error
    assert failure.attempts == len(fakes[0].arrivals) >= 3
    assert isinstance(failure, errors.Unavailable)


async def test_retry_after_beyond_the_deadline_gives_up_without_waiting(fakes):
    fakes[0].behave = unavailable("60")
    async with make_client(fakes, sleep=fail_if_called) as client:
        with pytest.raises(PersistUnavailable):
            await client.persist(ROOM_OF_W0, "10", [event(1)])


# -- order within a room, concurrency across rooms -------------------------------


async def test_requests_of_one_room_arrive_one_at_a_time_in_call_order(fakes):
    jitter = random.Random(3)

    async def random_delay(fake, request, room_id, body):
        await asyncio.sleep(jitter.uniform(0, 0.02))
        return await answer_ok(fake, request, room_id, body)

    fakes[0].behave = random_delay
    async with make_client(fakes) as client:
        await asyncio.gather(*(client.persist(ROOM_OF_W0, "10", [event(n)]) for n in range(20)))
    assert sent_event_ids(fakes[0]) == [f"$e{n}" for n in range(20)]
    assert fakes[0].max_in_flight_per_room == 1


def sent_event_ids(fake: FakePersister) -> list[str]:
    return [e["event_id"] for a in fake.arrivals for e in a.body["events"]]


async def one_after_the_other(first: Awaitable[Any], second: Awaitable[Any]) -> list[Any]:
    """Both calls' outcomes; the second is made once the first's request has
    left (made together, the first's request would carry both)."""
    started = asyncio.ensure_future(first)
    await asyncio.sleep(0.01)
    return await asyncio.gather(started, second, return_exceptions=True)


async def test_a_retried_request_is_not_overtaken_by_a_later_one_of_the_same_room(fakes):
    fakes[0].behave = first_then(unavailable("0.1"))
    async with make_client(fakes) as client:
        await one_after_the_other(
            client.persist(ROOM_OF_W0, "10", [event(1)]),
            client.persist(ROOM_OF_W0, "10", [event(2)]),
        )
    # The retry may carry the later call's events too, after its own.
    assert sent_event_ids(fakes[0]) == ["$e1", "$e1", "$e2"]


async def test_a_redirected_request_is_not_overtaken_by_a_later_one_of_the_same_room(fakes):
    w0, _, w2 = fakes
    w0.behave = first_then(misdirect_to("w2"))
    w2.behave = slow(0.05)
    async with make_client(fakes) as client:
        await one_after_the_other(
            client.persist(ROOM_OF_W0, "10", [event(1)]),
            client.persist(ROOM_OF_W0, "10", [event(2)]),
        )
    assert sent_event_ids(w2) == ["$e1", "$e2"]


async def test_different_rooms_are_persisted_concurrently(fakes):
    room_b_arrived = asyncio.Event()

    async def wait_for_room_b(fake, request, room_id, body):
        if room_id == ROOM_OF_W0:
            await asyncio.wait_for(room_b_arrived.wait(), 2)  # deadlocks if serialised
        else:
            room_b_arrived.set()
        return await answer_ok(fake, request, room_id, body)

    fakes[0].behave = wait_for_room_b
    async with make_client(fakes) as client:
        await asyncio.gather(
            client.persist(ROOM_OF_W0, "10", [event(1)]),
            client.persist(ANOTHER_ROOM_OF_W0, "10", [event(2)]),
        )


async def test_a_failed_request_does_not_block_the_rooms_later_requests(fakes):
    fakes[0].behave = first_then(answer_error(400, "M_BAD_JSON", "events[0].pdu: bad"))
    async with make_client(fakes) as client:
        first, second = await one_after_the_other(
            client.persist(ROOM_OF_W0, "10", [event(1)]),
            client.persist(ROOM_OF_W0, "10", [event(2)]),
        )
    assert isinstance(first, InvalidRequest)
    assert isinstance(second, wire.PersistResponse)


# -- requests of different rooms that leave together share an HTTP request ----------

ROOMS = [f"!batch{n}:example.org" for n in range(5)]


def by_room(behaviours: dict[str, Behaviour], default: Behaviour = answer_ok) -> Behaviour:
    async def behave(fake, request, room_id, body):
        return await behaviours.get(room_id, default)(fake, request, room_id, body)

    return behave


async def persist_together(client: PersisterClient, rooms: Sequence[str]) -> list[Any]:
    calls = [client.persist(room, "10", [event(n)]) for n, room in enumerate(rooms)]
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_requests_of_different_rooms_issued_together_leave_as_one_and_each_gets_its_answer(
    fakes,
):
    async with make_client(fakes, writers=("w0",)) as client:
        answers = await persist_together(client, ROOMS[:3])
    assert fakes[0].batches == [ROOMS[:3]]
    assert [a.results[0].event_id for a in answers] == ["$e0", "$e1", "$e2"]
    assert len({a.results[0].stream_ordering for a in answers}) == 3
    assert client.stats.batched == 3 and client.stats.batched_refused == 0


async def test_each_request_of_a_batch_meets_its_own_fate(fakes):
    fakes[0].behave = by_room({
        ROOMS[1]: answer_error(400, "M_BAD_JSON", "events[0].pdu: bad"),
        ROOMS[2]: first_then(misdirect_to("w2")),
        ROOMS[3]: first_then(unavailable("0")),
    })  # fmt: skip
    async with make_client(fakes, writers=("w0",)) as client:
        ok, bad, moved, busy = await persist_together(client, ROOMS[:4])
    assert isinstance(ok, wire.PersistResponse)
    assert isinstance(bad, InvalidRequest) and bad.room_id == ROOMS[1]
    assert isinstance(moved, wire.PersistResponse) and moved.position.instance == "w2"
    assert isinstance(busy, wire.PersistResponse)
    assert client.stats.redirects == 1 and client.stats.unavailable == 1


async def test_a_persister_that_refuses_batches_gets_each_request_alone(fakes):
    fakes[0].takes_batches = False
    async with make_client(fakes, writers=("w0",)) as client:
        answers = await persist_together(client, ROOMS[:3])
    assert all(isinstance(a, wire.PersistResponse) for a in answers)
    assert sorted(fakes[0].rooms_seen()) == sorted(ROOMS[:3])
    assert client.stats.batched_refused == 3


async def test_a_request_that_leaves_alone_goes_to_its_rooms_endpoint(fakes):
    async with make_client(fakes, writers=("w0",)) as client:
        await client.persist(ROOMS[0], "10", [event(1)])
        await client.persist(ROOMS[1], "10", [event(2)])
    assert fakes[0].batches == []
    assert fakes[0].rooms_seen() == ROOMS[:2]


async def test_a_batch_keeps_to_the_request_cap_and_batching_can_be_turned_off(fakes):
    capped = replace(FAST, batch_max_requests=2)
    async with make_client(fakes, capped, writers=("w0",)) as client:
        await persist_together(client, ROOMS)
    assert fakes[0].batches == [ROOMS[0:2], ROOMS[2:4]]  # the fifth went alone
    assert sorted(fakes[0].rooms_seen()) == sorted(ROOMS)
    fakes[0].batches.clear()
    async with make_client(fakes, replace(FAST, batch_max_requests=0), writers=("w0",)) as client:
        await persist_together(client, ROOMS)
    assert fakes[0].batches == []


async def test_a_batch_whose_answer_never_comes_is_retried_by_each_of_its_requests(fakes):
    fakes[0].behave = first_then(drop_connection)
    async with make_client(fakes, writers=("w0",)) as client:
        answers = await persist_together(client, ROOMS[:3])
    assert all(isinstance(a, wire.PersistResponse) for a in answers)
    assert client.stats.connection_errors == 3


async def test_requests_sent_while_a_small_one_is_unanswered_follow_it_as_one_batch(fakes):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    async with make_client(fakes, writers=("w0",)) as client:
        first = asyncio.ensure_future(client.persist(ROOMS[0], "10", [event(0)]))
        later = []
        for n, room in enumerate(ROOMS[1:4], start=1):
            await asyncio.sleep(0.02)  # each call in a turn of its own
            later.append(asyncio.ensure_future(client.persist(room, "10", [event(n)])))
        await asyncio.sleep(0.02)
        assert fakes[0].rooms_seen() == [ROOMS[0]]
        release.set()
        answers = await asyncio.gather(first, *later)
    assert fakes[0].batches == [ROOMS[1:4]]
    assert [a.results[0].event_id for a in answers] == ["$e0", "$e1", "$e2", "$e3"]


async def test_calls_made_while_their_rooms_request_waits_to_leave_travel_in_it(fakes):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    async with make_client(fakes, writers=("w0",)) as client:
        other_room = asyncio.ensure_future(client.persist(ROOMS[0], "10", [event(0)]))
        await asyncio.sleep(0.02)
        first = asyncio.ensure_future(client.persist(ROOMS[1], "10", [event(1)]))
        await asyncio.sleep(0.02)  # its request waits behind the unanswered one
        second = asyncio.ensure_future(client.persist(ROOMS[1], "10", [event(2)]))
        await asyncio.sleep(0.02)
        release.set()
        answers = await asyncio.gather(other_room, first, second)
    assert [a.room_id for a in fakes[0].arrivals] == [ROOMS[0], ROOMS[1]]
    assert sent_event_ids(fakes[0]) == ["$e0", "$e1", "$e2"]
    assert [[r.event_id for r in a.results] for a in answers] == [["$e0"], ["$e1"], ["$e2"]]
    assert client.stats.coalesced == 1


async def test_with_holding_back_off_each_request_leaves_as_it_is_sent(fakes):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    options = replace(FAST, max_small_exchanges=0)
    async with make_client(fakes, options, writers=("w0",)) as client:
        first = asyncio.ensure_future(client.persist(ROOMS[0], "10", [event(0)]))
        await asyncio.sleep(0.02)
        await client.persist(ROOMS[1], "10", [event(1)])  # answered while the first is held
        release.set()
        await first
    assert fakes[0].batches == []


# -- calls waiting behind a room's request leave together ---------------------------


def held_until(release: asyncio.Event) -> Behaviour:
    """Hold the first request until `release`, answer the others at once."""
    held = [False]

    async def behave(fake, request, room_id, body):
        if not held[0]:
            held[0] = True
            await asyncio.wait_for(release.wait(), 2)
        return await answer_ok(fake, request, room_id, body)

    return behave


async def calls_queued_behind_a_held_request(
    client: PersisterClient, release: asyncio.Event, calls: Sequence[Awaitable[Any]]
) -> list[Any]:
    """Start `calls` in order, the first once alone (so that it leaves alone:
    a request takes in the calls made before it leaves); its request is
    held until all are waiting."""
    tasks = [asyncio.ensure_future(calls[0])]
    await asyncio.sleep(0.02)
    tasks += [asyncio.ensure_future(call) for call in calls[1:]]
    await asyncio.sleep(0.05)
    release.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_calls_waiting_behind_a_rooms_request_leave_as_one_and_each_gets_its_own_results(
    fakes,
):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    async with make_client(fakes) as client:
        answers = await calls_queued_behind_a_held_request(
            client, release, [client.persist(ROOM_OF_W0, "10", [event(n)]) for n in range(6)]
        )
        assert client.stats.coalesced == 4
    assert [len(a.body["events"]) for a in fakes[0].arrivals] == [1, 5]
    assert sent_event_ids(fakes[0]) == [f"$e{n}" for n in range(6)]
    assert [[r.event_id for r in a.results] for a in answers] == [[f"$e{n}"] for n in range(6)]
    assert [a.results[0].stream_ordering for a in answers] == [1, 2, 3, 4, 5, 6]
    assert {a.position for a in answers[1:]} == {wire.Position("w0", 6)}


async def test_a_refused_coalesced_request_sends_each_call_alone_so_only_the_bad_one_fails(fakes):
    release = asyncio.Event()
    held = held_until(release)

    async def refuse_e3(fake, request, room_id, body):
        if "$e3" in [e["event_id"] for e in body["events"]]:
            return web.json_response({"errcode": "M_BAD_JSON", "error": "$e3 is bad"}, status=400)
        return await held(fake, request, room_id, body)

    fakes[0].behave = refuse_e3
    async with make_client(fakes) as client:
        answers = await calls_queued_behind_a_held_request(
            client, release, [client.persist(ROOM_OF_W0, "10", [event(n)]) for n in range(5)]
        )
        assert client.stats.coalesced_refused == 1
    assert [len(a.body["events"]) for a in fakes[0].arrivals] == [1, 4, 1, 1, 1, 1]
    assert isinstance(answers[3], InvalidRequest)
    assert "$e3 is bad" in answers[3].error
    good = [answers[n] for n in (0, 1, 2, 4)]
    assert [a.results[0].event_id for a in good] == ["$e0", "$e1", "$e2", "$e4"]


async def test_coalesced_requests_keep_to_the_event_and_byte_caps(fakes):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    options = ClientOptions(coalesce_max_events=3, coalesce_max_bytes=10_000)
    async with make_client(fakes, options=options) as client:
        big = {"pdu": {"type": "m.room.message", "body": "x" * 6_000}, "event_id": "$big"}
        await calls_queued_behind_a_held_request(
            client, release,
            [client.persist(ROOM_OF_W0, "10", [event(n)]) for n in range(5)]
            + [client.persist(ROOM_OF_W0, "10", [big]), client.persist(ROOM_OF_W0, "10", [big])],
        )  # fmt: skip
    assert [len(a.body["events"]) for a in fakes[0].arrivals] == [1, 3, 2, 1]
    assert sent_event_ids(fakes[0]) == [f"$e{n}" for n in range(5)] + ["$big", "$big"]


async def test_only_calls_of_the_same_room_version_and_kind_leave_together(fakes):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    async with make_client(fakes) as client:
        await calls_queued_behind_a_held_request(
            client, release,
            [client.persist(ROOM_OF_W0, "10", [event(0)]),
             client.persist(ROOM_OF_W0, "10", [event(1)]),
             client.persist(ROOM_OF_W0, "10", [event(2)], backfilled=True),
             client.persist(ROOM_OF_W0, "11", [event(3)]),
             client.persist(ROOM_OF_W0, "11", [event(4)])],
        )  # fmt: skip
    sent = [(a.body["room_version"], a.body["backfilled"], len(a.body["events"]))
            for a in fakes[0].arrivals]  # fmt: skip
    assert sent == [("10", False, 1), ("10", False, 1), ("10", True, 1), ("11", False, 2)]


async def test_coalescing_can_be_turned_off(fakes):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    async with make_client(fakes, options=ClientOptions(coalesce_max_events=0)) as client:
        await calls_queued_behind_a_held_request(
            client, release, [client.persist(ROOM_OF_W0, "10", [event(n)]) for n in range(4)]
        )
    assert [len(a.body["events"]) for a in fakes[0].arrivals] == [1, 1, 1, 1]


async def test_a_coalesced_request_that_gives_up_fails_every_call_it_carried(fakes):
    release = asyncio.Event()
    held = held_until(release)

    async def unavailable_after_first(fake, request, room_id, body):
        if fake.arrivals[0].body is body:
            return await held(fake, request, room_id, body)
        return await unavailable("0.05")(fake, request, room_id, body)

    fakes[0].behave = unavailable_after_first
    options = ClientOptions(deadline_s=0.4, backoff_initial_s=0.01)
    async with make_client(fakes, options=options) as client:
        started = time.monotonic()
        answers = await calls_queued_behind_a_held_request(
            client, release, [client.persist(ROOM_OF_W0, "10", [event(n)]) for n in range(4)]
        )
    assert isinstance(answers[0], wire.PersistResponse)
    assert all(isinstance(a, PersistUnavailable) for a in answers[1:])
    assert {a.room_id for a in answers[1:]} == {ROOM_OF_W0}
    assert time.monotonic() - started < 1.5  # one deadline for all, not one each
    assert all(len(a.body["events"]) == 3 for a in fakes[0].arrivals[1:])


async def test_calls_carried_by_a_cancelled_call_send_their_events_themselves(fakes):
    release = asyncio.Event()
    fakes[0].behave = held_until(release)
    async with make_client(fakes) as client:
        first = asyncio.ensure_future(client.persist(ROOM_OF_W0, "10", [event(0)]))
        await asyncio.sleep(0.02)
        # Behind the held request: e1 leads e2 and e3 when its turn comes.
        rest = [asyncio.ensure_future(client.persist(ROOM_OF_W0, "10", [event(n)]))
                for n in (1, 2, 3)]  # fmt: skip
        await asyncio.sleep(0.02)
        slow_leader = fakes[0].behave
        in_flight = asyncio.Event()

        async def hold_the_group(fake, request, room_id, body):
            if len(body["events"]) == 3:
                in_flight.set()
                await asyncio.sleep(5)
            return await slow_leader(fake, request, room_id, body)

        fakes[0].behave = hold_the_group
        release.set()
        await first
        await asyncio.wait_for(in_flight.wait(), 2)
        rest[0].cancel()
        answers = await asyncio.gather(*rest, return_exceptions=True)
    assert isinstance(answers[0], asyncio.CancelledError)
    assert [a.results[0].event_id for a in answers[1:]] == ["$e2", "$e3"]
    assert [len(a.body["events"]) for a in fakes[0].arrivals] == [1, 3, 2]


# -- errors that are not retried ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "errcode", "raised", "server_class"),
    [
        (400, "M_BAD_JSON", InvalidRequest, errors.BadRequest),
        (401, "M_UNKNOWN_TOKEN", AuthenticationFailed, errors.Unauthorized),
        (413, "M_TOO_LARGE", RequestTooLarge, errors.BodyTooLarge),
    ],
)
async def test_client_errors_raise_at_once_with_status_errcode_and_error(
    fakes, status, errcode, raised, server_class
):
    fakes[0].behave = answer_error(status, errcode, "events[3].pdu.depth: missing")
    async with make_client(fakes) as client:
        with pytest.raises(raised) as caught:
            await client.persist(ROOM_OF_W0, "10", [event(1)])
        assert client.stats.retries == 0
    failure = caught.value
    assert (failure.status, failure.errcode, failure.room_id) == (status, errcode, ROOM_OF_W0)
    assert "events[3].pdu.depth: missing" in failure.error
    assert isinstance(failure, PersistRejected)
    assert isinstance(failure, server_class)
    assert len(fakes[0].arrivals) == 1


async def test_other_4xx_raises_persist_rejected(fakes):
    fakes[0].behave = answer_error(404, "M_UNRECOGNIZED", "no such endpoint")
    async with make_client(fakes) as client:
        with pytest.raises(PersistRejected) as caught:
            await client.persist(ROOM_OF_W0, "10", [event(1)])
    assert caught.value.status == 404


async def test_500_raises_server_error_without_retrying(fakes):
    async def crash(fake, request, room_id, body):
        return web.Response(status=500, text="<html>Internal Server Error</html>")

    fakes[0].behave = crash
    async with make_client(fakes) as client:
        with pytest.raises(ServerError) as caught:
            await client.persist(ROOM_OF_W0, "10", [event(1)])
    assert caught.value.status == 500
    assert "Internal Server Error" in caught.value.error
    assert len(fakes[0].arrivals) == 1


async def test_unreadable_200_answer_is_a_server_error(fakes):
    async def nonsense(fake, request, room_id, body):
        return web.json_response({"ok": True})

    fakes[0].behave = nonsense
    async with make_client(fakes) as client:
        with pytest.raises(ServerError):
            await client.persist(ROOM_OF_W0, "10", [event(1)])


# -- lifecycle ------------------------------------------------------------------------


async def test_closed_client_refuses_to_persist(fakes):
    client = make_client(fakes)
    await client.persist(ROOM_OF_W0, "10", [event(1)])
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.persist(ROOM_OF_W0, "10", [event(2)])


async def test_stats_snapshot_does_not_change_afterwards(fakes):
    async with make_client(fakes) as client:
        before = client.stats.snapshot()
        await client.persist(ROOM_OF_W0, "10", [event(1)])
        assert before.attempts == 0
        assert client.stats.attempts == 1


@pytest.mark.parametrize(
    ("header", "expected"),
    [("2", 2.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), (None, None), ("nan", None)],
)
def test_retry_after_parsing(header, expected):
    assert parse_retry_after(header) == expected
