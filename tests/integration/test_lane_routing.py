"""Which lane writes a request (`persister.writer.routing`), end to end
against PostgreSQL: the requests of one exchange go together to the least
busy lane, and a room stays with the lane that holds any of its requests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from persister.errors import StoreUnavailable
from persister.http.app import build_app
from persister.server import build_writer
from persister.wire import BATCH_PATH
from persister.writer.lane import CommittedBatch
from persister.writer.routing import Together
from persister.writer.service import Writer
from tests.faults.test_partition_regressions import link_for
from tests.fixtures.persister import AUTH, SECRET, RoomBuilder, body, envelope, make_config

Client = TestClient[Any, Any]


def to_lane(index: int) -> Together:
    return Together(lambda: index, max_events=1000)


def record_commits(writer: Writer) -> list[tuple[int, list[str]]]:
    """(lane, rooms of its events) of each committed batch."""
    committed: list[tuple[int, list[str]]] = []
    for lane in writer.lanes:
        original = lane.on_commit

        async def recording(
            batch: CommittedBatch, original: Any = original, index: int = lane.index
        ) -> None:
            committed.append((index, [row.room_id for row in batch.events]))
            await original(batch)

        lane.on_commit = recording
    return committed


async def post_batch(api: Client, rooms: list[RoomBuilder]) -> list[int]:
    """One event for each room, in one exchange; the status of each answer."""
    requests = [
        {"room_id": room.room_id, "request": msgspec.Raw(body("10", envelope(room.event()[1])))}
        for room in rooms
    ]
    data = msgspec.json.encode({"requests": requests})
    answer = await api.post(BATCH_PATH, data=data, headers=AUTH)
    assert answer.status == 200
    return [r["status"] for r in (await answer.json())["responses"]]


async def until_no_room_is_held(writer: Writer) -> None:
    deadline = time.monotonic() + 5
    while len(writer.rooms):
        assert time.monotonic() < deadline, "a lane never released its rooms"
        await asyncio.sleep(0.01)


async def test_the_requests_of_one_exchange_are_written_together_by_one_lane(
    writer: Writer, api: Client
) -> None:
    committed = record_commits(writer)
    rooms = [RoomBuilder(room_id=f"!together{i}:example.org") for i in range(8)]
    assert await post_batch(api, rooms) == [200] * 8
    assert len(committed) == 1
    ((_, written),) = committed
    assert sorted(written) == sorted(room.room_id for room in rooms)
    await until_no_room_is_held(writer)


async def test_a_lane_with_requests_queued_is_not_chosen_while_another_is_free(
    writer: Writer,
) -> None:
    first = writer.choose_lane()
    link, size = link_for("!queued:example.org")
    done = writer.submit(link, size)
    # Queued in `first`, whose task has not taken it yet.
    assert writer.choose_lane() != first
    await done
    await until_no_room_is_held(writer)


async def test_a_rooms_requests_go_to_the_lane_that_holds_one_of_them(writer: Writer) -> None:
    committed = record_commits(writer)
    room = RoomBuilder(room_id="!held:example.org")
    links = []
    for _ in range(2):
        link, size = link_for(room.room_id)
        links.append((link, size))
    first = writer.submit(*links[0], to_lane(0))
    second = writer.submit(*links[1], to_lane(1))  # lane 0 holds the room
    assert writer.rooms.lane_of(room.room_id) == 0
    await asyncio.gather(first, second)
    assert {lane for lane, _ in committed} == {0}
    await until_no_room_is_held(writer)
    assert writer.rooms.lane_of(room.room_id) is None


async def test_a_lane_without_its_connection_leaves_new_rooms_to_the_others(
    writer: Writer,
) -> None:
    broken = writer.lanes[0]
    await broken._close_connection()
    try:
        assert writer.choose_lane() == 1
        link, size = link_for("!elsewhere:example.org")
        results = await writer.submit(link, size)  # lane 0 is not ready: lane 1 takes it
        assert [r.duplicate for r in results] == [False]
        # A room that lane 0 still holds is not written by another lane.
        writer.rooms.hold("!stuck:example.org", 0)
        link, size = link_for("!stuck:example.org")
        with pytest.raises(StoreUnavailable):
            writer.submit(link, size)
        writer.rooms.release("!stuck:example.org")
    finally:
        await broken.connect()
    await until_no_room_is_held(writer)


async def test_an_exchange_of_more_than_a_transaction_is_spread_over_the_lanes(
    database_url: str, redis_url: str, redis_channel: str
) -> None:
    config = make_config(database_url, redis_url, redis_channel, persist={"max_batch_events": 4})
    writer = build_writer(config, "persister1")
    await writer.start()
    try:
        committed = record_commits(writer)
        app = build_app(writer, SECRET, max_body=1024 * 1024, max_events=200)
        rooms = [RoomBuilder(room_id=f"!spread{i}:example.org") for i in range(8)]
        async with TestClient(TestServer(app)) as api:
            answer = await post_batch(api, rooms)
        assert answer == [200] * 8
        by_lane = sorted((lane, sorted(written)) for lane, written in committed)
        assert by_lane == [
            (0, sorted(room.room_id for room in rooms[:4])),
            (1, sorted(room.room_id for room in rooms[4:])),
        ]
    finally:
        await writer.drain(5)
        await writer.stop()
