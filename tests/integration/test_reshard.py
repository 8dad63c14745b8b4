"""Changing the writer pool while it runs (contract section 7)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from persister.http.app import build_app
from persister.reshard import with_pin, with_writers
from persister.server import build_writer
from persister.sharding import ShardMap
from persister.storage.shard_map import fence_txn, install_next_epoch, load_or_seed
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

POOL = {
    "stream_writers": {"events": ["persister1", "persister2"]},
    "instance_map": {
        "persister1": {"port": 18101},
        "persister2": {"port": 18102},
        "persister3": {"port": 18103},
    },
}


@pytest.fixture
async def pool(
    database_url: str, redis_url: str, redis_channel: str
) -> AsyncIterator[dict[str, TestClient[Any, Any]]]:
    config = make_config(database_url, redis_url, redis_channel, **POOL)
    writers: list[Writer] = []
    clients: dict[str, TestClient[Any, Any]] = {}
    for name in ("persister1", "persister2", "persister3"):
        writer = build_writer(config, name)
        await writer.start()
        writers.append(writer)
        client = TestClient(TestServer(build_app(writer, SECRET, 1 << 20, 200)))
        await client.start_server()
        clients[name] = client
    yield clients
    for client in clients.values():
        await client.close()
    for writer in writers:
        await writer.stop()


async def post(
    client: TestClient[Any, Any], room: RoomBuilder, pdu: dict[str, Any]
) -> tuple[int, Any]:
    resp = await client.post(
        events_path(room.room_id), data=body("10", envelope(pdu)), headers=AUTH
    )
    return resp.status, await resp.json()


def config_for(database_url: str) -> Any:
    return make_config(database_url, "redis://127.0.0.1:6379/0", "unused", **POOL)


async def test_a_pinned_room_moves_and_its_old_owner_answers_421_naming_the_new_one(
    pool: dict[str, TestClient[Any, Any]], database_url: str
) -> None:
    room = RoomBuilder(room_id="!a:example.org")  # persister2's under sha256 mod 2
    assert (await post(pool["persister2"], room, room.event()[1]))[0] == 200
    config = config_for(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await install_next_epoch(
            conn,
            ("persister1", "persister2"),
            "sha256",
            with_pin(config, room.room_id, "persister3"),
        )
    status, answer = await post(pool["persister2"], room, room.event(advance=False)[1])
    assert status == 421 and answer["owner"] == "persister3"
    status, answer = await post(pool["persister3"], room, room.event()[1])
    assert status == 200, answer
    with psycopg.connect(database_url) as conn:
        owners = conn.execute(
            "SELECT instance_name FROM events WHERE room_id = %s ORDER BY stream_ordering",
            (room.room_id,),
        ).fetchall()
    assert owners == [("persister2",), ("persister3",)]


async def test_a_new_writer_owns_nothing_until_a_map_names_it(
    pool: dict[str, TestClient[Any, Any]], database_url: str
) -> None:
    room = RoomBuilder(room_id="!a:example.org")
    status, answer = await post(pool["persister3"], room, room.event(advance=False)[1])
    assert status == 421 and answer["owner"] == "persister2"
    config = config_for(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        _, after = await install_next_epoch(
            conn,
            ("persister1", "persister2"),
            "sha256",
            with_writers(config, ["persister1", "persister2", "persister3"]),
        )
    owner = after.owner(room.room_id)
    status, answer = await post(pool[owner], room, room.event()[1])
    assert status == 200, answer


async def test_no_transaction_of_an_old_epoch_commits_after_the_new_epoch_takes_force(
    database_url: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as setup:
        await load_or_seed(setup, ("p1", "p2"), "sha256")
    writer = await psycopg.AsyncConnection.connect(database_url)
    resharder = await psycopg.AsyncConnection.connect(database_url)
    try:
        async with writer.transaction():
            epoch_seen = await fence_txn(writer.cursor())
            assert epoch_seen == 1
            bump = asyncio.create_task(
                install_next_epoch(
                    resharder,
                    ("p1", "p2"),
                    "sha256",
                    lambda m: msgspec.structs.replace(m, writers=("p1",)),
                )
            )
            await asyncio.sleep(0.3)
            # The exclusive lock waits for this transaction to end.
            assert not bump.done()
        _, after = await bump
        assert after.epoch == 2
        async with writer.transaction():
            assert await fence_txn(writer.cursor()) == 2
    finally:
        await writer.close()
        await resharder.close()


async def test_concurrent_first_starts_seed_a_single_epoch(database_url: str) -> None:
    async def seed() -> ShardMap:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            return await load_or_seed(conn, ("p1", "p2"), "sha256")

    maps = await asyncio.gather(*(seed() for _ in range(4)))
    assert {m.epoch for m in maps} == {1}
