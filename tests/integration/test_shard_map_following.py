"""Everyone learns a new shard map without a restart (contract section 7).

Three real persisters (writer + HTTP app, in this process) on the test's
database; the map starts as epoch 1 = [persister1, persister2] (sha256).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import psycopg
import pytest
from aiohttp.test_utils import TestServer

from persister.client import ClientOptions, PersisterClient
from persister.config import Config
from persister.http.app import build_app
from persister.replication.publisher import redis_client
from persister.replication.reader import StreamReader
from persister.replication.shardmap import SHARD_MAP_PATH, encode_announcement
from persister.reshard import AnnounceFailed, apply_change, with_pin, with_writers
from persister.server import build_writer
from persister.sharding import ShardMap
from persister.storage.shard_map import (
    install_in_force,
    install_next_epoch,
    leaving_writers,
    load_or_seed,
    load_shard_map,
)
from persister.storage.streams import upsert_stream_position_txn
from persister.writer.service import Writer
from tests.fixtures.persister import SECRET, RoomBuilder, make_config
from tests.integration.stream_writers import connect, draw, eventually

NAMES = ("persister1", "persister2", "persister3")
POOL = {
    "stream_writers": {"events": ["persister1", "persister2"]},
    "instance_map": {name: {"port": 18101 + i} for i, name in enumerate(NAMES)},
}
ROOM = "!a:example.org"  # persister2's under sha256 mod 2


@dataclass
class Pool:
    config: Config
    writers: dict[str, Writer]
    addresses: dict[str, tuple[str, int]]

    def client(self, **kwargs: Any) -> PersisterClient:
        return PersisterClient(["persister1", "persister2"], self.addresses, SECRET, **kwargs)


@pytest.fixture
async def pool(database_url: str, redis_url: str, redis_channel: str) -> AsyncIterator[Pool]:
    config = make_config(database_url, redis_url, redis_channel, **POOL)
    writers: dict[str, Writer] = {}
    servers: list[TestServer] = []
    addresses = {}
    try:
        for name in NAMES:
            writers[name] = build_writer(config, name)
            await writers[name].start()
            server = TestServer(build_app(writers[name], SECRET, 1 << 20, 200))
            await server.start_server()
            servers.append(server)
            addresses[name] = ("127.0.0.1", server.port)
        yield Pool(config, writers, addresses)
    finally:
        for server in servers:
            await server.close()
        for writer in writers.values():
            await writer.stop()


async def send(client: PersisterClient, room: RoomBuilder) -> int:
    _, pdu = room.event()
    answer = await client.persist(room.room_id, room.room_version, [{"pdu": pdu}])
    return answer.results[0].stream_ordering


async def stored_epoch(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        current = await load_shard_map(conn)
    assert current is not None
    return current.epoch


# -- the persister serves the map --------------------------------------------------


async def test_a_persister_serves_the_map_in_force_to_holders_of_the_secret(pool: Pool) -> None:
    await apply_change(pool.config, with_pin(pool.config, ROOM, "persister3"))
    host, port = pool.addresses["persister1"]
    url = f"http://{host}:{port}{SHARD_MAP_PATH}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as answer:
            assert answer.status == 401
        async with http.get(url, headers={"Authorization": f"Bearer {SECRET}"}) as answer:
            assert answer.status == 200
            served = await answer.json()
    assert served["epoch"] == 2
    assert served["writers"] == ["persister1", "persister2"]
    assert served["pins"] == {ROOM: "persister3"}
    assert served["sharding"] == "sha256"
    assert served["sequence_at_start"] >= 0


# -- the client ---------------------------------------------------------------------


async def test_a_client_learns_the_new_map_from_the_persister_that_answered_421(
    pool: Pool,
) -> None:
    room = RoomBuilder(room_id=ROOM)
    async with pool.client() as client:
        await send(client, room)
        await apply_change(pool.config, with_pin(pool.config, ROOM, "persister3"))
        await send(client, room)  # 421 from persister2, followed to persister3
        assert client.stats.redirects == 1
        await eventually(lambda: client.shard_map.epoch == 2)
        assert client.shard_map.pins == {ROOM: "persister3"}
        assert client.remembered_owners == 0  # the map says it now
        await send(client, room)
        assert client.stats.redirects == 1


async def test_a_following_client_adopts_an_announced_map_before_any_421(pool: Pool) -> None:
    async with pool.client() as client:
        await client.follow_redis(pool.config.redis.url, pool.config.redis.channel)
        await asyncio.sleep(0.2)  # subscribed
        await apply_change(pool.config, with_writers(pool.config, list(NAMES)))
        await eventually(lambda: client.shard_map.epoch == 2)
        assert client.writers == NAMES
        assert client.stats.attempts == 0


async def test_a_following_client_polls_the_map_when_no_message_comes(
    pool: Pool, database_url: str
) -> None:
    async with pool.client(options=ClientOptions(shard_map_poll_s=0.1)) as client:
        await client.follow_redis(pool.config.redis.url, pool.config.redis.channel)
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            # Installed behind the CLI's back: no SHARDMAP message at all.
            await install_next_epoch(
                conn, ("persister1", "persister2"), "sha256",
                with_writers(pool.config, ["persister2", "persister3"]),
            )  # fmt: skip
        await eventually(lambda: client.writers == ("persister2", "persister3"))


async def test_a_room_moved_off_a_dead_persister_does_not_sit_out_its_backoff(
    pool: Pool, free_port: int
) -> None:
    addresses = {**pool.addresses, "ghost": ("127.0.0.1", free_port)}  # nobody listens
    slow = ClientOptions(backoff_initial_s=4.0, backoff_max_s=4.0, deadline_s=20.0)
    room = RoomBuilder(room_id=ROOM)
    async with PersisterClient(["ghost"], addresses, SECRET, options=slow) as client:
        sending = asyncio.create_task(send(client, room))
        await eventually(lambda: client.stats.connection_errors == 1)
        started = asyncio.get_running_loop().time()
        await client.refresh_shard_map("persister1")  # epoch 1: the room is persister2's
        await sending
        assert asyncio.get_running_loop().time() - started < 1.0  # not the >= 2 s backoff
        assert client.stats.connection_errors == 1


@pytest.fixture
def free_port() -> int:
    from persister.bench.pool import free_port as pick

    return pick()


async def test_a_reshard_that_cannot_announce_changes_nothing(
    pool: Pool, database_url: str
) -> None:
    unreachable = make_config(
        database_url, "redis://127.0.0.1:1/0", pool.config.redis.channel, **POOL
    )
    with pytest.raises(AnnounceFailed, match="nothing changed"):
        await apply_change(unreachable, with_writers(unreachable, list(NAMES)))
    assert await stored_epoch(database_url) == 1


# -- the stream reader --------------------------------------------------------------


async def test_a_reader_counts_a_new_writer_at_once_and_a_removed_one_until_it_has_announced(
    pool: Pool, database_url: str
) -> None:
    config = pool.config
    reader = StreamReader(
        config.redis.url, config.redis.channel, database_url, ["persister1", "persister2"]
    )
    await reader.start()
    minima: list[int] = []

    async def watch() -> None:
        while True:
            minima.append(reader.complete_up_to())
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        assert reader.state.writers == {"persister1", "persister2"}
        await apply_change(config, with_writers(config, list(NAMES)))
        await eventually(lambda: "persister3" in reader.state.writers)
        async with pool.client() as client:
            await client.refresh_shard_map()
            rooms = [RoomBuilder(room_id=f"!r{i}:example.org") for i in range(12)]
            orderings = [await send(client, room) for room in rooms]
            assert {client.owner_of(r.room_id) for r in rooms} == set(NAMES)
            assert await reader.wait_for(max(orderings), timeout=5)

            await apply_change(config, with_writers(config, ["persister1", "persister2"]))
            start = (await reader_map(database_url)).sequence_at_start
            await eventually(lambda: reader.state.writers == {"persister1", "persister2"})
            known = reader.state.known("persister3")
            assert known is not None and known >= start  # it left only once it had announced
            orderings = [await send(client, room) for room in rooms]
            assert await reader.wait_for(max(orderings), timeout=5)
    finally:
        watcher.cancel()
        await reader.close()
    assert minima == sorted(minima)


async def reader_map(database_url: str) -> ShardMap:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        current = await load_shard_map(conn)
    assert current is not None
    return current


async def test_a_writer_named_only_by_a_reshard_that_rolled_back_stops_counting(
    pool: Pool, database_url: str
) -> None:
    config = pool.config
    reader = StreamReader(
        config.redis.url, config.redis.channel, database_url, ["persister1", "persister2"],
        shard_map_poll_s=0.1,
    )  # fmt: skip
    await reader.start()
    redis = redis_client(config.redis.url)
    try:

        async def announce_then_fail(after: ShardMap) -> None:
            await redis.publish(config.redis.channel, encode_announcement(after, in_force=False))
            await eventually(lambda: reader.state.known("ghost") is not None)
            raise RuntimeError("the reshard dies before its COMMIT")

        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            with pytest.raises(RuntimeError):
                await install_next_epoch(
                    conn, ("persister1", "persister2"), "sha256",
                    lambda m: msgspec.structs.replace(m, writers=(*m.writers, "ghost")),
                    before_commit=announce_then_fail,
                )  # fmt: skip
        async with pool.client() as client:
            ordering = await send(client, RoomBuilder(room_id=ROOM))
        # "ghost" runs nowhere and never wrote: once the map poll sees that
        # its epoch was not installed, it no longer holds the minimum back.
        assert await reader.wait_for(ordering, timeout=5)
        assert reader.state.writers == {"persister1", "persister2"}
    finally:
        await redis.aclose()
        await reader.close()


# -- who still counts -----------------------------------------------------------------


async def test_a_removed_writer_is_leaving_until_its_stored_position_reaches_the_start(
    database_url: str,
) -> None:
    async with await connect(database_url) as conn:
        await load_or_seed(conn, ("p1", "p2", "p3"), "rendezvous")
        await draw(conn, 10)
        async with conn.transaction(), conn.cursor() as cur:
            await upsert_stream_position_txn(cur, "events", "p3", 4)
        _, after = await install_in_force(
            conn, ("p1", "p2", "p3"), "rendezvous",
            lambda m: msgspec.structs.replace(m, writers=("p1", "p2"), pins={"!r:x": "p9"}),
        )  # fmt: skip
        assert after.sequence_at_start == 10
        assert await leaving_writers(conn, after) == {"p3"}  # p9, a pin target, is in the map
        async with conn.transaction(), conn.cursor() as cur:
            await upsert_stream_position_txn(cur, "events", "p3", 10)
        assert await leaving_writers(conn, after) == set()
