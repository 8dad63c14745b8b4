"""Bugs the partition test (test_partition.py) found, each pinned down without a network.

- A request is checked against the shard map when it arrives, and committed
  later by a lane. If the map moved the room meanwhile and the lane had
  already loaded the new map (a poll, or another request's 421), the fence
  compared equal epochs and the old owner committed the room in the new
  epoch: two owners in one epoch.
- A lane that lost its database connection reconnected only when a batch
  came, but the writer answered 503 at once for a lane without a
  connection, so no batch ever came: its rooms got 503 until a restart.
- Without TCP probes, PostgreSQL keeps a partitioned persister's sessions
  (its liveness lock, its open transactions) for hours.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from persister.dag import LinkRequest
from persister.errors import NotMyShard, StoreUnavailable
from persister.matrix.pdu import prepare_events
from persister.reshard import with_pin
from persister.server import build_writer
from persister.sharding import sha256_owner
from persister.storage.keepalive import with_partition_detection
from persister.storage.shard_map import install_next_epoch
from persister.wire import EventEnvelope, PersistRequest
from persister.writer.service import Writer
from tests.fixtures.persister import RoomBuilder, make_config

POOL = {
    "stream_writers": {"events": ["persister1", "persister2"]},
    "instance_map": {"persister1": {"port": 18101}, "persister2": {"port": 18102}},
}


def room_of(owner: str) -> str:
    writers = ["persister1", "persister2"]
    return next(
        room
        for room in (f"!regress{i}:example.org" for i in range(1000))
        if sha256_owner(room, writers) == owner
    )


def link_for(room_id: str) -> tuple[LinkRequest, int]:
    _, pdu = RoomBuilder("10", room_id).event()
    raw = msgspec.json.encode(pdu)
    request = PersistRequest("10", [EventEnvelope(msgspec.Raw(raw))])
    return LinkRequest(room_id, "10", False, prepare_events(request, room_id)), len(raw)


@pytest.fixture
async def persister1(
    database_url: str, redis_url: str, redis_channel: str
) -> AsyncIterator[Writer]:
    writer = build_writer(make_config(database_url, redis_url, redis_channel, **POOL), "persister1")
    await writer.start()
    yield writer
    await writer.drain(5)
    await writer.stop()


async def count_events(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM events")
        row = await cur.fetchone()
    return int(row[0]) if row else -1


async def test_a_request_checked_under_an_older_epoch_is_not_committed_by_the_old_owner(
    persister1: Writer, database_url: str
) -> None:
    room = room_of("persister1")
    await persister1.check_owner(room)  # the HTTP layer's check: still ours
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        pin = with_pin(
            make_config(database_url, "redis://unused", "unused", **POOL), room, "persister2"
        )
        await install_next_epoch(conn, ("persister1", "persister2"), "sha256", pin)
    await persister1.owners.refresh()  # the lane's map is already the new one
    link, size = link_for(room)
    with pytest.raises(NotMyShard):
        await persister1.persist(link, size)
    assert await count_events(database_url) == 0


async def test_a_lane_that_lost_its_connection_reconnects_without_waiting_for_a_request(
    persister1: Writer, database_url: str
) -> None:
    lane = persister1.lanes[0]
    assert lane.connection is not None
    pid = lane.connection.info.backend_pid
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    # The lane learns it on its next batch, which fails with 503.
    room = next(
        r
        for r in (f"!lane{i}:example.org" for i in range(1000))
        if sha256_owner(r, ["persister1", "persister2"]) == "persister1"
        and persister1.lanes[hash_lane(persister1, r)] is lane
    )
    link, size = link_for(room)
    with pytest.raises(StoreUnavailable):
        await persister1.persist(link, size)
    deadline = time.monotonic() + 10
    while not lane.ready:
        assert time.monotonic() < deadline, "the lane never reconnected"
        await asyncio.sleep(0.05)
    link, size = link_for(room)
    results = await persister1.persist(link, size)
    assert [r.duplicate for r in results] == [False]


def hash_lane(writer: Writer, room_id: str) -> int:
    return zlib.crc32(room_id.encode("utf-8")) % len(writer.lanes)


def test_partition_detection_adds_tcp_probes_on_both_ends() -> None:
    params: dict[str, Any] = conninfo_to_dict(
        with_partition_detection("postgresql://u@127.0.0.1:5432/db")
    )
    assert params["keepalives_idle"] == "2" and params["tcp_user_timeout"] == "5000"
    assert "-c tcp_keepalives_idle=2" in params["options"]
    assert "-c tcp_user_timeout=5000" in params["options"]
    assert (params["host"], params["port"], params["dbname"]) == ("127.0.0.1", "5432", "db")


def test_partition_detection_keeps_what_the_url_sets() -> None:
    url = "postgresql://h/db?keepalives_idle=30&options=-c%20tcp_user_timeout%3D100"
    params: dict[str, Any] = conninfo_to_dict(with_partition_detection(url))
    assert params["keepalives_idle"] == "30"
    assert "tcp_user_timeout=100" in params["options"]
    assert "tcp_user_timeout=5000" not in params["options"]
