"""The persist API of contract section 3, end to end against PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from persister.http.app import build_app
from tests.fixtures.persister import (
    AUTH,
    SECRET,
    TWO_WRITERS,
    RoomBuilder,
    api_of,
    body,
    envelope,
    events_path,
    make_config,
)

Client = TestClient[Any, Any]


async def post(api: Client, room: RoomBuilder, *pdus: dict[str, Any], **kw: Any) -> tuple[int, Any]:
    data = body(room.room_version, *(envelope(p) for p in pdus), **kw)
    resp = await api.post(events_path(room.room_id), data=data, headers=AUTH)
    return resp.status, await resp.json()


def rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(query, params).fetchall()


async def test_an_event_is_answered_with_its_stream_ordering_and_is_in_the_tables(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    event_id, pdu = room.event()
    status, answer = await post(api, room, pdu)
    assert status == 200, answer
    [result] = answer["results"]
    assert result["event_id"] == event_id and result["duplicate"] is False
    assert result["depth"] == 1
    assert answer["position"]["instance"] == "persister1"
    assert answer["position"]["stream_id"] >= result["stream_ordering"] > 0
    stored = rows(
        database_url,
        "SELECT stream_ordering, topological_ordering, instance_name, outlier, type "
        "FROM events WHERE event_id = %s",
        event_id,
    )
    assert stored == [(result["stream_ordering"], 1, "persister1", False, "m.room.message")]
    assert rows(
        database_url, "SELECT room_version FROM event_json WHERE event_id = %s", event_id
    ) == [("10",)]
    assert rows(database_url, "SELECT event_id FROM event_forward_extremities") == [(event_id,)]


async def test_events_of_a_request_are_persisted_in_order_and_may_chain(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    pdus = [room.event()[1] for _ in range(5)]
    status, answer = await post(api, room, *pdus)
    assert status == 200, answer
    orderings = [r["stream_ordering"] for r in answer["results"]]
    assert orderings == sorted(orderings) and len(set(orderings)) == 5
    assert rows(database_url, "SELECT event_id FROM event_forward_extremities") == [
        (room.extremities[0],)
    ]
    assert rows(database_url, "SELECT count(*) FROM event_edges") == [(4,)]
    assert rows(database_url, "SELECT count(*) FROM event_backward_extremities") == [(0,)]


async def test_persisting_an_event_twice_returns_its_original_ordering(api: Client) -> None:
    room = RoomBuilder()
    _, pdu = room.event()
    _, first = await post(api, room, pdu)
    status, second = await post(api, room, pdu)
    assert status == 200
    assert second["results"][0]["duplicate"] is True
    assert second["results"][0]["stream_ordering"] == first["results"][0]["stream_ordering"]


async def test_backfilled_events_take_negative_orderings_and_leave_forward_extremities(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    old_id, old = room.event(prevs=["$gone:example.org"], depth=1)
    new_id, new = room.event(prevs=[old_id], depth=2)
    assert (await post(api, room, new))[0] == 200
    status, answer = await post(api, room, old, backfilled=True)
    assert status == 200, answer
    assert answer["results"][0]["stream_ordering"] < 0
    assert rows(database_url, "SELECT event_id FROM event_forward_extremities") == [(new_id,)]
    assert rows(database_url, "SELECT event_id FROM event_backward_extremities") == [
        ("$gone:example.org",)
    ]


async def test_outliers_and_rejected_events_are_stored_but_never_extremities(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    first_id, first = room.event()
    await post(api, room, first)
    _, outlier = room.event(prevs=["$unknown:x"], advance=False)
    rejected_id, rejected = room.event(prevs=[first_id], advance=False)
    data = body(
        "10", envelope(outlier, outlier=True), envelope(rejected, rejected_reason="auth_error")
    )
    resp = await api.post(events_path(room.room_id), data=data, headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert rows(database_url, "SELECT event_id FROM event_forward_extremities") == [(first_id,)]
    assert rows(database_url, "SELECT count(*) FROM event_backward_extremities") == [(0,)]
    assert rows(database_url, "SELECT event_id, reason FROM rejections") == [
        (rejected_id, "auth_error")
    ]
    assert rows(database_url, "SELECT count(*) FROM events WHERE outlier") == [(1,)]


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic test-secret", "Bearer"])
async def test_a_missing_or_wrong_secret_is_401_and_stores_nothing(
    api: Client, database_url: str, header: str | None
) -> None:
    room = RoomBuilder()
    headers = {} if header is None else {"Authorization": header}
    resp = await api.post(
        events_path(room.room_id), data=body("10", envelope(room.event()[1])), headers=headers
    )
    assert resp.status == 401
    assert (await resp.json())["errcode"] in ("M_MISSING_TOKEN", "M_UNKNOWN_TOKEN")
    assert rows(database_url, "SELECT count(*) FROM events") == [(0,)]


async def test_a_request_with_one_bad_event_stores_none_of_its_events(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    _, good = room.event()
    _, bad = room.event()
    bad = {**bad, "depth": "deep"}
    status, answer = await post(api, room, good, bad)
    assert status == 400
    assert "events[1]" in answer["error"] and "depth" in answer["error"]
    assert rows(database_url, "SELECT count(*) FROM events") == [(0,)]


async def test_a_room_version_change_for_a_stored_room_is_refused(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    await post(api, room, room.event()[1])
    other = RoomBuilder("11", room.room_id)
    other.extremities = room.extremities
    status, answer = await post(api, other, other.event()[1])
    assert status == 400 and "room_version" in answer["error"]
    assert rows(database_url, "SELECT count(*) FROM events") == [(1,)]


async def test_a_body_over_the_limit_is_413(writer: Any) -> None:
    app = build_app(writer, SECRET, max_body=2048, max_events=200)
    async with TestClient(TestServer(app)) as api:
        room = RoomBuilder()
        _, pdu = room.event(content={"body": "x" * 4000, "msgtype": "m.text"})
        resp = await api.post(
            events_path(room.room_id), data=body("10", envelope(pdu)), headers=AUTH
        )
        assert resp.status == 413
        assert (await resp.json())["errcode"] == "M_TOO_LARGE"


async def test_a_room_owned_by_another_persister_is_421_naming_the_owner(
    database_url: str, redis_url: str, redis_channel: str
) -> None:
    config = make_config(database_url, redis_url, redis_channel, **TWO_WRITERS)
    async with api_of(config) as api:
        # sha256("!b:example.org") read little-endian is odd: persister2's room.
        room = RoomBuilder(room_id=_room_owned_by_second_of_two())
        status, answer = await post(api, room, room.event()[1])
        assert status == 421
        assert answer["owner"] == "persister2"
    assert rows(database_url, "SELECT count(*) FROM events") == [(0,)]


def _room_owned_by_second_of_two() -> str:
    import hashlib

    for i in range(100):
        room_id = f"!r{i}:example.org"
        if int.from_bytes(hashlib.sha256(room_id.encode()).digest(), "little") % 2 == 1:
            return room_id
    raise AssertionError("no room found")


async def test_a_full_queue_answers_503_with_retry_after(
    database_url: str, redis_url: str, redis_channel: str
) -> None:
    config = make_config(
        database_url,
        redis_url,
        redis_channel,
        persist={"max_queued_events": 5, "max_events_per_request": 5},
    )
    async with api_of(config, max_events=5) as api:
        rooms = [RoomBuilder(room_id=f"!flood{i}:example.org") for i in range(40)]
        answers = await asyncio.gather(
            *(
                api.post(
                    events_path(r.room_id),
                    data=body("10", *(envelope(r.event()[1]) for _ in range(5))),
                    headers=AUTH,
                )
                for r in rooms
            )
        )
        statuses = [a.status for a in answers]
        assert 503 in statuses and 200 in statuses
        refused = next(a for a in answers if a.status == 503)
        assert int(refused.headers["Retry-After"]) >= 1
    stored = rows(database_url, "SELECT count(*) FROM events")[0][0]
    assert stored == 5 * statuses.count(200)


async def test_many_concurrent_requests_to_the_same_and_different_rooms(
    api: Client, database_url: str
) -> None:
    rooms = [RoomBuilder(room_id=f"!busy{i}:example.org") for i in range(8)]
    requests = []
    for _ in range(10):
        for room in rooms:
            requests.append((room, [room.event()[1] for _ in range(3)]))

    async def send_room(room: RoomBuilder) -> list[int]:
        statuses = []
        for r, pdus in requests:
            if r is room:
                statuses.append((await post(api, room, *pdus))[0])
        return statuses

    results = await asyncio.gather(*(send_room(r) for r in rooms))
    assert all(s == 200 for statuses in results for s in statuses)
    assert rows(database_url, "SELECT count(*) FROM events") == [(240,)]
    forward = rows(database_url, "SELECT room_id, event_id FROM event_forward_extremities")
    assert sorted(forward) == sorted((r.room_id, r.extremities[0]) for r in rooms)


async def test_health_answers_200_once_accepting_writes(api: Client) -> None:
    resp = await api.get("/health")
    assert resp.status == 200


async def test_a_late_prev_event_fills_the_gap_without_becoming_a_forward_extremity(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    late_id, late = room.event()
    child_id, child = room.event()
    assert (await post(api, room, child))[0] == 200
    assert rows(database_url, "SELECT event_id FROM event_backward_extremities") == [(late_id,)]
    assert (await post(api, room, late))[0] == 200
    assert rows(database_url, "SELECT event_id FROM event_backward_extremities") == []
    assert rows(database_url, "SELECT event_id FROM event_forward_extremities") == [(child_id,)]


async def test_an_outlier_later_sent_as_a_timeline_event_is_deoutliered(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    event_id, pdu = room.event()
    data = body("10", envelope(pdu, outlier=True))
    first = await (await api.post(events_path(room.room_id), data=data, headers=AUTH)).json()
    status, second = await post(api, room, pdu)
    assert status == 200
    assert second["results"][0]["duplicate"] is False
    assert second["results"][0]["stream_ordering"] == first["results"][0]["stream_ordering"]
    assert rows(database_url, "SELECT outlier FROM events WHERE event_id = %s", event_id) == [
        (False,)
    ]
    assert rows(database_url, "SELECT event_id FROM event_forward_extremities") == [(event_id,)]


async def started_room(api: Client) -> tuple[RoomBuilder, str]:
    """A room whose first event is stored, and that event's ID."""
    room = RoomBuilder()
    first_id, first = room.event()
    await send(api, room, first)
    return room, first_id


def forward_extremities(database_url: str) -> list[str]:
    return [e for (e,) in rows(database_url, "SELECT event_id FROM event_forward_extremities")]


async def send(api: Client, room: RoomBuilder, pdu: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """POST one event with envelope fields `kw` (`backfilled` goes on the body)."""
    backfilled = kw.pop("backfilled", False)
    data = body(room.room_version, envelope(pdu, **kw), backfilled=backfilled)
    resp = await api.post(events_path(room.room_id), data=data, headers=AUTH)
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def test_a_rejected_outlier_sent_again_as_a_timeline_event_is_never_a_forward_extremity(
    api: Client, database_url: str
) -> None:
    room, create_id = await started_room(api)
    outlier_id, outlier = room.event(prevs=[create_id], advance=False)
    await send(api, room, outlier, outlier=True, rejected_reason="auth_error")
    answer = await send(api, room, outlier)
    assert answer["results"][0]["duplicate"] is False
    assert forward_extremities(database_url) == [create_id]
    assert rows(database_url, "SELECT event_id FROM rejections") == [(outlier_id,)]
    assert rows(database_url, "SELECT outlier FROM events WHERE event_id = %s", outlier_id) == [
        (False,)
    ]


async def test_an_outlier_sent_again_in_a_backfilled_request_leaves_the_forward_extremities(
    api: Client, database_url: str
) -> None:
    room, create_id = await started_room(api)
    _, outlier = room.event(prevs=[create_id], advance=False)
    await send(api, room, outlier, outlier=True)
    await send(api, room, outlier, backfilled=True)
    assert forward_extremities(database_url) == [create_id]


async def test_a_forward_extremity_a_backfilled_event_lists_leaves_with_the_next_event(
    api: Client, database_url: str
) -> None:
    room, create_id = await started_room(api)
    backfilled_id, backfilled = room.event(prevs=[create_id], advance=False)
    await send(api, room, backfilled, backfilled=True)
    assert forward_extremities(database_url) == [create_id]
    next_id, following = room.event(prevs=[backfilled_id])
    await send(api, room, following)
    assert forward_extremities(database_url) == [next_id]


async def test_a_backward_extremity_arriving_as_a_rejected_event_stops_being_one(
    api: Client, database_url: str
) -> None:
    room = RoomBuilder()
    late_id, late = room.event()
    child_id, child = room.event()
    await send(api, room, child)
    assert rows(database_url, "SELECT event_id FROM event_backward_extremities") == [(late_id,)]
    await send(api, room, late, rejected_reason="auth_error")
    assert rows(database_url, "SELECT event_id FROM event_backward_extremities") == []
    assert forward_extremities(database_url) == [child_id]
