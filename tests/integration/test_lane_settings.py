"""The lanes' batching settings: `persist.commit_in_draw_order` and
`persist.max_batch_delay_ms`.

`commit_in_draw_order`: a writer's lanes commit in the order they drew.

Both lanes draw stream orderings from one sequence. A lane that commits
while the other lane's lower orderings are still open has its events held
back from every reader until that other transaction ends. With the setting,
a lane sends its write only once every lower ordering of the writer has
finished, so commits complete in ordering order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from persister.http.app import build_app
from persister.server import build_writer
from persister.writer.lane import CommittedBatch
from persister.writer.service import Writer
from tests.fixtures.persister import (
    AUTH,
    SECRET,
    RoomBuilder,
    body,
    envelope,
    events_path,
    make_config,
)

ROOMS = 32
REQUESTS_PER_ROOM = 16


async def started_writer(
    database_url: str, redis_url: str, channel: str, in_order: bool, delay_ms: float = 0.0
) -> Writer:
    persist = {"commit_in_draw_order": in_order, "max_batch_delay_ms": delay_ms}
    config = make_config(database_url, redis_url, channel, persist=persist)
    writer = build_writer(config, "persister1")
    await writer.start()
    return writer


def record_commits(writer: Writer) -> list[tuple[int, int]]:
    """(lowest, highest) forward ordering of each batch, in the order COMMITs returned."""
    committed: list[tuple[int, int]] = []
    for lane in writer.lanes:
        original = lane.on_commit

        async def recording(batch: CommittedBatch, original: Any = original) -> None:
            forward = [row.stream_ordering for row in batch.events if row.stream_ordering > 0]
            if forward:
                committed.append((min(forward), max(forward)))
            await original(batch)

        lane.on_commit = recording
    return committed


async def load_both_lanes(writer: Writer) -> None:
    app = build_app(writer, SECRET, max_body=1024 * 1024, max_events=200)
    rooms = [RoomBuilder(room_id=f"!order{i}:example.org") for i in range(ROOMS)]
    lanes_used = {writer._lane_for(room.room_id) for room in rooms}
    assert len(lanes_used) == 2, "the rooms must spread over both lanes"
    async with TestClient(TestServer(app)) as api:

        async def send(room: RoomBuilder) -> None:
            for _ in range(REQUESTS_PER_ROOM):
                data = body(room.room_version, *(envelope(room.event()[1]) for _ in range(2)))
                answer = await api.post(events_path(room.room_id), data=data, headers=AUTH)
                assert answer.status == 200, await answer.text()

        await asyncio.gather(*(send(room) for room in rooms))


@pytest.fixture
async def in_order_writer(
    database_url: str, redis_url: str, redis_channel: str
) -> AsyncIterator[Writer]:
    writer = await started_writer(database_url, redis_url, redis_channel, in_order=True)
    yield writer
    await writer.drain(5)
    await writer.stop()


async def test_lanes_asked_to_commit_in_draw_order_do(in_order_writer: Writer) -> None:
    committed = record_commits(in_order_writer)
    await load_both_lanes(in_order_writer)
    assert len(committed) >= 10
    lowest = [low for low, _ in committed]
    assert lowest == sorted(lowest)
    # Each commit leaves nothing of this writer open below its batch, so the
    # position covers the batch as soon as it commits.
    assert in_order_writer.positions.position() >= max(high for _, high in committed)


@pytest.mark.parametrize("delay_ms", [0.0, 300.0])
async def test_an_idle_lane_waits_max_batch_delay_for_more_requests_to_join_its_batch(
    database_url: str, redis_url: str, redis_channel: str, delay_ms: float
) -> None:
    writer = await started_writer(database_url, redis_url, redis_channel, False, delay_ms)
    try:
        committed = record_commits(writer)
        app = build_app(writer, SECRET, max_body=1024 * 1024, max_events=200)
        room = RoomBuilder(room_id="!delay:example.org")
        first, second = (body(room.room_version, envelope(room.event()[1])) for _ in range(2))
        async with TestClient(TestServer(app)) as api:
            path = events_path(room.room_id)
            sending = asyncio.ensure_future(api.post(path, data=first, headers=AUTH))
            await asyncio.sleep(0.1)
            answers = await asyncio.gather(sending, api.post(path, data=second, headers=AUTH))
            assert [a.status for a in answers] == [200, 200]
    finally:
        await writer.drain(5)
        await writer.stop()
    assert len(committed) == (1 if delay_ms else 2)
