"""Batches of rooms a lane remembers go in one round trip (persister.writer.memory).

The write takes nothing on trust: when the rooms are not as the lane
remembers them, the database refuses the batch, it is rolled back, and the
lane loads and writes it the usual way, with the answer loading gives. Such
refusals roll back, and a rollback must leave the lane's prepared statements
in place.
"""

from __future__ import annotations

from typing import Any

import psycopg
from aiohttp.test_utils import TestClient

from persister.storage import events_txn, pipeline
from persister.writer.lane import Lane
from persister.writer.service import Writer
from tests.fixtures.persister import AUTH, RoomBuilder, body, envelope, events_path

Client = TestClient[Any, Any]


async def persist(api: Client, room: RoomBuilder, pdu: dict[str, Any]) -> dict[str, Any]:
    answer = await api.post(
        events_path(room.room_id), data=body(room.room_version, envelope(pdu)), headers=AUTH
    )
    assert answer.status == 200, await answer.text()
    result: dict[str, Any] = await answer.json()
    return result


async def two_events(api: Client, room: RoomBuilder) -> tuple[str, str]:
    """Persist two events of `room`, the second after the first; their IDs."""
    first, pdu = room.event()
    await persist(api, room, pdu)
    second, pdu = room.event()
    await persist(api, room, pdu)
    return first, second


def lane_of(writer: Writer, room: RoomBuilder) -> Lane:
    return writer._lane_for(room.room_id)


async def forward_extremities(database_url: str, room_id: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT event_id FROM event_forward_extremities WHERE room_id = %s", (room_id,)
        )
        return {row[0] for row in await cur.fetchall()}


async def stored(database_url: str, event_id: str) -> list[tuple[int, int]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT stream_ordering, topological_ordering FROM events WHERE event_id = %s",
            (event_id,),
        )
        return [(row[0], row[1]) for row in await cur.fetchall()]


async def test_a_room_the_lane_wrote_takes_one_round_trip_per_batch_after_the_first(
    writer: Writer, api: Client, database_url: str
) -> None:
    room = RoomBuilder(room_id="!remembered:example.org")
    lane = lane_of(writer, room)
    orderings = []
    for _ in range(4):
        event_id, pdu = room.event()
        answer = await persist(api, room, pdu)
        (result,) = answer["results"]
        ordering = result["stream_ordering"]
        assert await stored(database_url, event_id) == [(ordering, result["depth"])]
        orderings.append(ordering)
    assert lane.batches_in_one_round_trip == 3
    assert orderings == sorted(orderings)
    assert await forward_extremities(database_url, room.room_id) == {event_id}
    assert writer.positions.position() >= orderings[-1]
    metrics = writer.metrics.render().decode()
    assert 'persister_batches_total{instance="persister1",round_trips="1"} 3.0' in metrics


async def test_a_fork_from_an_older_event_is_linked_as_loading_would(
    writer: Writer, api: Client, database_url: str
) -> None:
    room = RoomBuilder(room_id="!fork:example.org")
    first, second = await two_events(api, room)
    fork, pdu = room.event(prevs=[first], advance=False)
    await persist(api, room, pdu)
    assert lane_of(writer, room).batches_in_one_round_trip == 2
    assert await forward_extremities(database_url, room.room_id) == {second, fork}


async def test_when_the_extremities_are_not_as_remembered_the_batch_is_loaded_instead(
    writer: Writer, api: Client, database_url: str
) -> None:
    room = RoomBuilder(room_id="!stale:example.org")
    first, second = await two_events(api, room)
    lane = lane_of(writer, room)
    # As if the lane had missed its own last commit.
    lane.memory._rooms[room.room_id].forward_extremities = {first}
    third, pdu = room.event(prevs=[first], advance=False)
    answer = await persist(api, room, pdu)
    assert lane.batches_in_one_round_trip == 1  # the refused batch did not count
    (result,) = answer["results"]
    assert await stored(database_url, third) == [(result["stream_ordering"], result["depth"])]
    assert await forward_extremities(database_url, room.room_id) == {second, third}
    assert writer.positions.position() >= result["stream_ordering"]


async def test_an_event_stored_before_the_lane_remembered_it_is_still_a_duplicate(
    writer: Writer, api: Client, database_url: str
) -> None:
    room = RoomBuilder(room_id="!resent:example.org")
    await persist(api, room, room.event()[1])
    event_id, pdu = room.event()
    first_answer = await persist(api, room, pdu)
    lane = lane_of(writer, room)
    # As if it had been written before the lane's memory began.
    del lane.memory._rooms[room.room_id].recent[event_id]
    again = await persist(api, room, pdu)
    assert again["results"][0]["duplicate"] is True
    assert again["results"][0]["stream_ordering"] == first_answer["results"][0]["stream_ordering"]
    assert len(await stored(database_url, event_id)) == 1
    assert await forward_extremities(database_url, room.room_id) == {event_id}


async def test_an_extremity_remembered_but_not_stored_refuses_the_batch_too(
    writer: Writer, api: Client, database_url: str
) -> None:
    room = RoomBuilder(room_id="!extra:example.org")
    first, second = await two_events(api, room)
    lane = lane_of(writer, room)
    # Remembered as still an extremity, which it stopped being.
    lane.memory._rooms[room.room_id].forward_extremities.add(first)
    third, pdu = room.event()
    answer = await persist(api, room, pdu)
    assert lane.batches_in_one_round_trip == 1
    assert answer["results"][0]["duplicate"] is False
    assert await forward_extremities(database_url, room.room_id) == {third}


async def test_a_rolled_back_batch_leaves_the_lane_its_prepared_statements(
    writer: Writer, api: Client, database_url: str
) -> None:
    room = RoomBuilder(room_id="!rollback:example.org")
    lane = lane_of(writer, room)
    assert lane.connection is not None
    for _ in range(8):  # often enough for psycopg to prepare it, were it allowed to
        await lane._check_idle_connection()
    await pipeline.round_trip(lane.connection, (events_txn.BEGIN,))
    await lane._end_failed_transaction()
    event_id, pdu = room.event()
    await persist(api, room, pdu)
    assert len(await stored(database_url, event_id)) == 1
