"""The batch endpoint (`persister.http.app.persist_batch`): several rooms'
persist requests in one HTTP request, each answered exactly as its room's
own endpoint would answer it, end to end against PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import psycopg
import pytest
from aiohttp.test_utils import TestClient

from persister.wire import BATCH_PATH
from persister.writer.service import Writer
from tests.fixtures.persister import (
    AUTH,
    TWO_WRITERS,
    RoomBuilder,
    api_of,
    body,
    envelope,
    make_config,
)
from tests.integration.test_persist_api import _room_owned_by_second_of_two

Client = TestClient[Any, Any]


def item(room: RoomBuilder, *pdus: dict[str, Any]) -> dict[str, Any]:
    request = body(room.room_version, *(envelope(p) for p in pdus))
    return {"room_id": room.room_id, "request": msgspec.Raw(request)}


async def post_batch(api: Client, *items: dict[str, Any]) -> tuple[int, Any]:
    data = msgspec.json.encode({"requests": list(items)})
    resp = await api.post(BATCH_PATH, data=data, headers=AUTH)
    return resp.status, await resp.json()


def stored_events(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT event_id FROM events")}


async def test_each_request_of_a_batch_is_answered_as_its_rooms_endpoint_would(
    api: Client, database_url: str
) -> None:
    first, broken, last = (RoomBuilder(room_id=f"!r{n}:example.org") for n in range(3))
    first_ids = [first.event() for _ in range(2)]
    _, bad = broken.event()
    last_id, last_pdu = last.event()
    status, answer = await post_batch(
        api,
        item(first, *(pdu for _, pdu in first_ids)),
        item(broken, {**bad, "depth": "deep"}),
        item(last, last_pdu),
    )
    assert status == 200, answer
    ok, refused, also_ok = answer["responses"]
    assert ok["status"] == 200 and also_ok["status"] == 200
    assert [r["event_id"] for r in ok["body"]["results"]] == [i for i, _ in first_ids]
    assert also_ok["body"]["results"][0]["event_id"] == last_id
    assert ok["body"]["position"]["instance"] == "persister1"
    assert refused["status"] == 400
    assert "events[0]" in refused["body"]["error"] and "depth" in refused["body"]["error"]
    assert stored_events(database_url) == {first_ids[0][0], first_ids[1][0], last_id}


async def test_a_batch_naming_a_room_twice_is_refused_whole_and_stores_nothing(
    api: Client, database_url: str
) -> None:
    room, other = RoomBuilder(room_id="!r0:example.org"), RoomBuilder(room_id="!r1:example.org")
    status, answer = await post_batch(
        api, item(room, room.event()[1]), item(other, other.event()[1]), item(room, room.event()[1])
    )
    assert status == 400
    assert "requests[2].room_id" in answer["error"] and "twice" in answer["error"]
    assert stored_events(database_url) == set()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"requests": []}', "at least one request"),
        (b'{"requests": [{"room_id": 1, "request": {}}]}', "room_id"),
        (b'{"requests": [{"room_id": "!r:x"}]}', "request"),
        (b"{not json", "not valid JSON"),
    ],
)
async def test_an_empty_or_malformed_batch_is_400_naming_what_is_wrong(
    api: Client, database_url: str, data: bytes, words: str
) -> None:
    resp = await api.post(BATCH_PATH, data=data, headers=AUTH)
    assert resp.status == 400
    assert words in (await resp.json())["error"]
    assert stored_events(database_url) == set()


async def test_a_batch_needs_the_secret(api: Client, database_url: str) -> None:
    room = RoomBuilder()
    data = msgspec.json.encode({"requests": [item(room, room.event()[1])]})
    resp = await api.post(BATCH_PATH, data=data, headers={"Content-Type": "application/json"})
    assert resp.status == 401
    assert stored_events(database_url) == set()


async def test_a_request_for_another_persisters_room_is_421_and_the_others_are_stored(
    database_url: str, redis_url: str, redis_channel: str
) -> None:
    config = make_config(database_url, redis_url, redis_channel, **TWO_WRITERS)
    async with api_of(config) as api:
        theirs = RoomBuilder(room_id=_room_owned_by_second_of_two())
        ours = RoomBuilder(room_id="!abc:example.org")  # persister1's (sha256 rule)
        ours_id, ours_pdu = ours.event()
        status, answer = await post_batch(
            api, item(theirs, theirs.event()[1]), item(ours, ours_pdu)
        )
    assert status == 200, answer
    moved, kept = answer["responses"]
    assert moved["status"] == 421 and moved["body"]["owner"] == "persister2"
    assert kept["status"] == 200
    assert stored_events(database_url) == {ours_id}


async def test_requests_a_full_queue_cannot_take_are_503_with_retry_after(
    database_url: str, redis_url: str, redis_channel: str
) -> None:
    limits = {"max_queued_events": 5, "max_events_per_request": 5}
    config = make_config(database_url, redis_url, redis_channel, persist=limits)
    async with api_of(config, max_events=50) as api:
        rooms = [RoomBuilder(room_id=f"!flood{i}:example.org") for i in range(40)]
        status, answer = await post_batch(
            api, *(item(r, *(r.event()[1] for _ in range(5))) for r in rooms)
        )
    assert status == 200, answer
    statuses = [a["status"] for a in answer["responses"]]
    assert 503 in statuses and 200 in statuses
    refused = next(a for a in answer["responses"] if a["status"] == 503)
    assert refused["retry_after_s"] >= 1
    assert len(stored_events(database_url)) == 5 * statuses.count(200)


async def test_a_request_that_is_not_a_persist_request_is_400_and_the_others_go_on(
    api: Client, database_url: str
) -> None:
    good = RoomBuilder(room_id="!good:example.org")
    good_id, good_pdu = good.event()
    status, answer = await post_batch(
        api,
        {"room_id": "!text:example.org", "request": "not an object"},
        {"room_id": "!empty:example.org", "request": {"room_version": "10", "events": []}},
        {"room_id": "!bad:example.org", "request": {"room_version": "99", "events": [{}]}},
        item(good, good_pdu),
    )
    assert status == 200, answer
    statuses = [a["status"] for a in answer["responses"]]
    assert statuses == [400, 400, 400, 200]
    assert "request body" in answer["responses"][0]["body"]["error"]
    assert "at least one event" in answer["responses"][1]["body"]["error"]
    assert stored_events(database_url) == {good_id}


async def test_a_persister_that_takes_no_writes_refuses_a_batch_whole_before_reading_it(
    api: Client, writer: Writer, database_url: str
) -> None:
    await writer.drain(5)
    room = RoomBuilder()
    status, answer = await post_batch(api, item(room, room.event()[1]))
    assert status == 503 and "not accepting" in answer["error"]
    assert stored_events(database_url) == set()


async def test_a_batch_whose_client_gives_up_is_still_stored_whole(
    api: Client, database_url: str
) -> None:
    rooms = [RoomBuilder(room_id=f"!gone{n}:example.org") for n in range(3)]
    events = [room.event() for room in rooms]
    data = msgspec.json.encode(
        {"requests": [item(room, pdu) for room, (_, pdu) in zip(rooms, events, strict=True)]}
    )
    # The lanes wait on this lock until the client has given up.
    async with await psycopg.AsyncConnection.connect(database_url) as blocker:
        await blocker.execute("LOCK TABLE event_json IN EXCLUSIVE MODE")
        with pytest.raises(TimeoutError):
            await api.post(
                BATCH_PATH, data=data, headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.3)
            )
    for _ in range(100):
        if stored_events(database_url) == {event_id for event_id, _ in events}:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"stored: {stored_events(database_url)}")
