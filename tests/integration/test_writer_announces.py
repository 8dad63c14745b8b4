"""A running writer announces every rise of its position at once (stream lag).

Readers take the minimum over all writers, so a writer that knows it may
announce a higher position and waits for its next commit or heartbeat
holds every reader back. And a writer with peers tells them how far the
shared sequence went as soon as it draws orderings (a DRAWN hint, on a
channel of writers only, the only one writers follow), so that idle peers
announce that far before its commit, not after. These drive a real Writer
with hand-written peer messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from persister.http.app import build_app
from persister.replication.messages import RData, decode_command, encode_command, position_command
from persister.replication.peers import Drawn, encode_drawn
from persister.replication.publisher import hints_channel
from persister.server import build_writer
from persister.sharding import sha256_owner
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
from tests.integration.stream_writers import eventually, until_subscribed


@pytest.fixture
async def peer(writer: Writer, redis_url: str, redis_channel: str) -> AsyncIterator[Redis]:
    """A client to announce in a peer's name, once the writer follows the hints."""
    client = Redis.from_url(redis_url)
    await until_subscribed(client, hints_channel(redis_channel))
    yield client
    await client.aclose()


async def hint_peer(peer: Redis, channel: str, reached: int) -> None:
    await peer.publish(hints_channel(channel), encode_drawn("persister2", reached))


async def test_a_peers_hint_seen_while_orderings_are_drawn_is_announced_when_the_draw_ends(
    writer: Writer, peer: Redis, redis_channel: str
) -> None:
    token = writer.positions.begin_fetch()  # a lane's nextval in flight
    ahead = writer.position() + 7
    await hint_peer(peer, redis_channel, ahead)
    await eventually(lambda: writer.positions.max_seen() == ahead, timeout=2.0)
    await asyncio.sleep(0.05)
    assert writer.publisher.announced() != ahead  # the draw may still return lower values
    writer.positions.end_fetch(token, [])  # it returned none: the peer's position is ours
    # Asked for at once (not at the next commit or heartbeat): the flush waits for it.
    assert await writer.publisher.flush(1.0)
    assert writer.publisher.announced() == ahead


async def test_an_idle_writer_announces_a_peers_drawn_hint_before_that_peer_commits(
    writer: Writer, peer: Redis, redis_channel: str
) -> None:
    ahead = writer.position() + 7  # beyond the sequence: only the peer can take it there
    await hint_peer(peer, redis_channel, ahead)
    # Well within the 1 s heartbeat, which could not reach it anyway.
    await eventually(lambda: writer.publisher.announced() == ahead, timeout=0.5)


async def test_a_writer_takes_nothing_from_the_readers_channel(
    writer: Writer, peer: Redis, redis_channel: str
) -> None:
    # The readers' channel carries every writer's rows and positions: a
    # writer woken by each of them spent its CPU on its own echoes.
    ahead = writer.position() + 7
    further = ahead + 10
    await peer.publish(redis_channel, encode_command(position_command("persister2", 0, further)))
    await peer.publish(redis_channel, encode_drawn("persister2", further))
    # Published after them, so a writer following both would have them first.
    await hint_peer(peer, redis_channel, ahead)
    await eventually(lambda: writer.positions.max_seen() >= ahead, timeout=2.0)
    await asyncio.sleep(0.05)
    assert writer.positions.max_seen() == ahead
    await eventually(lambda: writer.publisher.announced() == ahead, timeout=0.5)


class Recorder:
    """Every message on the channels, in arrival order (Redis delivers one
    connection's publishes in order across channels), decoded as writers and
    readers decode them."""

    def __init__(self, redis_url: str, *channels: str) -> None:
        self._client = Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._channels = channels
        self.messages: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        await self._pubsub.subscribe(*self._channels)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            message = await self._pubsub.get_message(timeout=1.0)
            if message is not None:
                self.messages.append(message["data"])

    def hints_of(self, instance: str) -> list[int]:
        hints = []
        for data in self.messages:
            if b'"DRAWN"' in data:
                hint = msgspec.json.decode(data, type=Drawn)
                if hint.instance == instance:
                    hints.append(hint.reached)
        return hints

    def first_hint_covering(self, instance: str, ordering: int) -> int | None:
        """Index of the first DRAWN of `instance` that reached `ordering`."""
        for index, data in enumerate(self.messages):
            if b'"DRAWN"' in data:
                hint = msgspec.json.decode(data, type=Drawn)
                if hint.instance == instance and hint.reached >= ordering:
                    return index
        return None

    def first_rdata_with(self, instance: str, ordering: int) -> int | None:
        """Index of the message that announced `ordering`."""
        for index, data in enumerate(self.messages):
            command = decode_command(data)
            if (
                isinstance(command, RData)
                and command.instance == instance
                and any(row.stream_ordering == ordering for row in command.rows)
            ):
                return index
        return None


async def persist_one(writer: Writer) -> int:
    """One event, through the persist API, in a room this writer owns; its ordering."""
    room_id = next(
        f"!hint{i}:example.org"
        for i in range(1000)
        if sha256_owner(f"!hint{i}:example.org", writer.owners.current.writers) == writer.instance
    )
    room = RoomBuilder(room_id=room_id)
    app = build_app(writer, SECRET, max_body=1024 * 1024, max_events=10)
    async with TestClient(TestServer(app)) as api:
        response = await api.post(
            events_path(room_id), data=body("10", envelope(room.event()[1])), headers=AUTH
        )
        answer = await response.json()
    assert response.status == 200, answer
    return int(answer["results"][0]["stream_ordering"])


@pytest.fixture
async def writer_with_a_peer(
    database_url: str, redis_url: str, redis_channel: str
) -> AsyncIterator[Writer]:
    config = make_config(
        database_url,
        redis_url,
        redis_channel,
        stream_writers={"events": ["persister1", "persister2"]},
        instance_map={
            "persister1": {"host": "127.0.0.1", "port": 18101},
            "persister2": {"host": "127.0.0.1", "port": 18102},
        },
    )
    w = build_writer(config, "persister1")
    await w.start()
    yield w
    await w.drain(5)
    await w.stop()


async def test_a_writer_with_peers_tells_them_how_far_it_drew_before_announcing_the_batch(
    writer_with_a_peer: Writer, redis_url: str, redis_channel: str
) -> None:
    async with Recorder(redis_url, redis_channel, hints_channel(redis_channel)) as recorder:
        ordering = await persist_one(writer_with_a_peer)
        await eventually(lambda: recorder.first_rdata_with("persister1", ordering) is not None)
    announced_at = recorder.first_rdata_with("persister1", ordering)
    hinted_at = recorder.first_hint_covering("persister1", ordering)
    assert announced_at is not None and hinted_at is not None
    assert hinted_at < announced_at


async def test_readers_channel_carries_no_hints_from_a_writer_with_peers(
    writer_with_a_peer: Writer, redis_url: str, redis_channel: str
) -> None:
    async with (
        Recorder(redis_url, redis_channel) as readers,
        Recorder(redis_url, hints_channel(redis_channel)) as writers,
    ):
        ordering = await persist_one(writer_with_a_peer)
        await eventually(lambda: readers.first_rdata_with("persister1", ordering) is not None)
        await eventually(lambda: writers.first_hint_covering("persister1", ordering) is not None)
    assert not any(b'"DRAWN"' in data for data in readers.messages)


async def test_a_writer_alone_in_its_pool_sends_no_hints(
    writer: Writer, redis_url: str, redis_channel: str
) -> None:
    async with Recorder(redis_url, redis_channel, hints_channel(redis_channel)) as recorder:
        ordering = await persist_one(writer)
        await eventually(lambda: recorder.first_rdata_with("persister1", ordering) is not None)
    assert recorder.hints_of("persister1") == []
