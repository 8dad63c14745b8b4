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
from persister.reshard import reshard_main, with_pin, with_writers
from persister.server import build_writer
from persister.sharding import ShardMap
from persister.storage.shard_map import (
    drain_epoch,
    fence_txn,
    install_next_epoch,
    load_or_seed,
    load_shard_map,
)
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


def _room_owned_by(instance: str, writers: tuple[str, ...]) -> RoomBuilder:
    placement = ShardMap(1, writers)
    for n in range(1000):
        room_id = f"!r{n}:example.org"
        if placement.owner(room_id) == instance:
            return RoomBuilder(room_id=room_id)
    raise AssertionError(f"no room placed on {instance}")


async def test_a_writer_that_gains_a_room_writes_its_other_rooms_while_the_old_owner_drains(
    pool: dict[str, TestClient[Any, Any]], database_url: str
) -> None:
    writers = ("persister1", "persister2")
    gained, kept = _room_owned_by("persister2", writers), _room_owned_by("persister1", writers)
    assert (await post(pool["persister2"], gained, gained.event()[1]))[0] == 200
    async with await psycopg.AsyncConnection.connect(database_url) as old_owner:
        async with old_owner.transaction():
            # persister2's write transaction of epoch 1, still in flight.
            assert await fence_txn(old_owner.cursor(), 1) == (1, True, None)
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                await install_next_epoch(
                    conn,
                    writers,
                    "sha256",
                    with_pin(config_for(database_url), gained.room_id, "persister1"),
                )
            moved = asyncio.create_task(post(pool["persister1"], gained, gained.event()[1]))
            status, answer = await asyncio.wait_for(
                post(pool["persister1"], kept, kept.event()[1]), 5.0
            )
            assert status == 200, answer  # not held up by the drain
            await asyncio.sleep(0.2)
            assert not moved.done()  # waits for the old owner's transaction
        status, answer = await asyncio.wait_for(moved, 5.0)
    assert status == 200, answer
    with psycopg.connect(database_url) as conn:
        start = conn.execute("SELECT sequence_at_start FROM shard_map_epochs WHERE epoch = 2")
        (sequence_at_start,) = start.fetchone() or (None,)
        writes = conn.execute(
            "SELECT instance_name, stream_ordering FROM events WHERE room_id = %s"
            " ORDER BY stream_ordering",
            (gained.room_id,),
        ).fetchall()
    assert sequence_at_start is not None
    assert [w for w, _ in writes] == ["persister2", "persister1"]
    assert writes[0][1] <= sequence_at_start < writes[1][1]


def _drop_p2(current: ShardMap) -> ShardMap:
    return msgspec.structs.replace(current, writers=("p1",))


async def _seeded(database_url: str) -> None:
    await _seeded_with(database_url, ("p1", "p2"))


async def _draw_ordering(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT nextval('events_stream_seq')")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_an_install_waits_for_no_write_transaction_and_routes_at_its_commit(
    database_url: str,
) -> None:
    await _seeded(database_url)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as old_writer,
        await psycopg.AsyncConnection.connect(database_url) as resharder,
        await psycopg.AsyncConnection.connect(database_url) as new_writer,
    ):
        async with old_writer.transaction():
            assert await fence_txn(old_writer.cursor(), 1) == (1, True, None)
            _, after = await asyncio.wait_for(
                install_next_epoch(resharder, ("p1", "p2"), "sha256", _drop_p2), 2.0
            )
            assert (after.epoch, after.in_force) == (2, False)
            # A transaction routed by the new epoch passes its fence at once,
            # while one of the old epoch is still open: rooms that do not
            # move are never held up.
            async with new_writer.transaction():
                fenced = await asyncio.wait_for(fence_txn(new_writer.cursor(), 2), 2.0)
                assert fenced == (2, False, None)


async def test_a_drain_waits_for_the_old_epochs_transactions_and_starts_after_their_orderings(
    database_url: str,
) -> None:
    await _seeded(database_url)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as old_writer,
        await psycopg.AsyncConnection.connect(database_url) as resharder,
    ):
        async with old_writer.transaction():
            await fence_txn(old_writer.cursor(), 1)
            await install_next_epoch(resharder, ("p1", "p2"), "sha256", _drop_p2)
            drain = asyncio.create_task(drain_epoch(resharder, 2))
            await asyncio.sleep(0.3)
            assert not drain.done()  # the old epoch's transaction is still open
            last_old = await _draw_ordering(old_writer)
        start = await asyncio.wait_for(drain, 2.0)
        assert start >= last_old
        async with old_writer.transaction():
            # The old epoch's writer now finds the new epoch, in force, and
            # its map, so that it may go on under it if its rooms stayed.
            assert await fence_txn(old_writer.cursor(), 1) == (
                2,
                True,
                ShardMap(2, ("p1",), "sha256", {}, start),
            )
        assert (await load_shard_map(resharder)) == ShardMap(2, ("p1",), "sha256", {}, start)


async def test_a_drain_of_an_epoch_in_force_returns_its_start_at_once(database_url: str) -> None:
    await _seeded(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await install_next_epoch(conn, ("p1", "p2"), "sha256", _drop_p2)
        start = await drain_epoch(conn, 2)
        async with await psycopg.AsyncConnection.connect(database_url) as other:
            async with other.transaction():
                await fence_txn(other.cursor(), 2)  # holds the new epoch's lock
                assert await asyncio.wait_for(drain_epoch(conn, 2), 2.0) == start


async def test_an_epoch_replaced_while_draining_is_drained_with_it(database_url: str) -> None:
    await _seeded(database_url)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as epoch_2_writer,
        await psycopg.AsyncConnection.connect(database_url) as resharder,
    ):
        await install_next_epoch(resharder, ("p1", "p2"), "sha256", _drop_p2)
        async with epoch_2_writer.transaction():
            await fence_txn(epoch_2_writer.cursor(), 2)
            await install_next_epoch(
                resharder,
                ("p1", "p2"),
                "sha256",
                lambda m: msgspec.structs.replace(m, writers=("p2",)),
            )
            drain = asyncio.create_task(drain_epoch(resharder, 3))
            await asyncio.sleep(0.3)
            # Epoch 2 never took force, but its transactions may have written
            # rooms that epoch 3 moves: the drain of 3 waits for them too.
            assert not drain.done()
        await asyncio.wait_for(drain, 2.0)
        stored = await load_shard_map(resharder, 2)
        assert stored is not None and not stored.in_force


async def test_concurrent_first_starts_seed_a_single_epoch(database_url: str) -> None:
    async def seed() -> ShardMap:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            return await load_or_seed(conn, ("p1", "p2"), "sha256")

    maps = await asyncio.gather(*(seed() for _ in range(4)))
    assert {m.epoch for m in maps} == {1}


async def test_the_reshard_command_puts_an_epoch_in_force_shows_it_and_finishes_an_interrupted_one(
    database_url: str, redis_url: str, redis_channel: str
) -> None:
    config = make_config(database_url, redis_url, redis_channel, **POOL)
    await _seeded_with(database_url, ("persister1", "persister2"))
    said = await reshard_main(config, "persister1,persister2,persister3", None, None, False)
    assert said.startswith("epoch 2 in force: writers persister1,persister2,persister3")
    shown = await reshard_main(config, None, None, None, True)
    assert shown.splitlines()[0].startswith("epoch 2 (sha256), in force since stream position")
    again = await reshard_main(config, "persister1,persister2,persister3", None, None, False)
    assert again.startswith("epoch 2 unchanged")
    # Installed by a reshard that died before draining it:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await install_next_epoch(
            conn, ("persister1", "persister2"), "sha256", with_writers(config, ["persister1"])
        )
    shown = await reshard_main(config, None, None, None, True)
    assert "being drained" in shown.splitlines()[0]
    finished = await reshard_main(config, "persister1", None, None, False)
    assert finished.startswith("epoch 3 (left installed by an interrupted reshard) in force")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        current = await load_shard_map(conn)
    assert current is not None and current.in_force and current.writers == ("persister1",)


async def _seeded_with(database_url: str, writers: tuple[str, ...]) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as setup:
        await load_or_seed(setup, writers, "sha256")
