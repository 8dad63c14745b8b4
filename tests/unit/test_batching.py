"""The client's Batcher on its own, against a scripted `post`: which
requests leave when, in which HTTP request, and with how much of their time.

(Its use by the client against real HTTP servers is in
tests/integration/test_client.py.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import msgspec
import pytest
import yarl

from persister import wire
from persister.batching import Answer, Batcher

ADDRESS = ("127.0.0.1", 8008)
SMALL = b'{"events": []}'
TIMEOUT_S = 5.0


@dataclass
class Exchange:
    url: yarl.URL
    body: bytes
    timeout_s: float
    answer: asyncio.Future[Answer] = field(repr=False)

    def rooms(self) -> list[str]:
        if self.url.path != wire.BATCH_PATH:
            return [self.url.path.split("/")[4]]
        return [item.room_id for item in wire.batch_request_decoder.decode(self.body).requests]

    def answer_ok(self) -> None:
        rooms = self.rooms()
        if self.url.path != wire.BATCH_PATH:
            self.answer.set_result((200, None, b"{}"))
            return
        answers = [wire.BatchAnswer(200, msgspec.Raw(b"{}")) for _ in rooms]
        self.answer.set_result((200, None, wire.encoder.encode(wire.BatchResponse(answers))))


class ScriptedPersister:
    """Every exchange waits until the test answers it."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    async def post(self, url: yarl.URL, body: bytes, timeout_s: float) -> Answer:
        exchange = Exchange(url, body, timeout_s, asyncio.get_running_loop().create_future())
        self.exchanges.append(exchange)
        return await asyncio.wait_for(exchange.answer, timeout_s)

    def rooms_sent(self) -> list[list[str]]:
        return [exchange.rooms() for exchange in self.exchanges]


@pytest.fixture
def persister() -> ScriptedPersister:
    return ScriptedPersister()


def batcher_for(persister: ScriptedPersister, **options: int) -> Batcher:
    return Batcher(persister.post, lambda sent, refused: None, **options)


def send(
    batcher: Batcher, room: str, body: bytes = SMALL, timeout_s: float = TIMEOUT_S
) -> asyncio.Task[Answer]:
    return asyncio.ensure_future(batcher.exchange(ADDRESS, room, body, timeout_s))


async def turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_requests_sent_while_a_small_exchange_is_unanswered_wait_and_then_leave_as_one(
    persister,
):
    batcher = batcher_for(persister)
    first = send(batcher, "a")
    await turns()
    later = []
    for room in "bcd":
        later.append(send(batcher, room))
        await turns()  # each in a turn of its own
    assert persister.rooms_sent() == [["a"]]
    persister.exchanges[0].answer_ok()
    await first
    await turns()
    assert persister.rooms_sent() == [["a"], ["b", "c", "d"]]
    persister.exchanges[1].answer_ok()
    assert await asyncio.gather(*later) == [(200, None, b"{}")] * 3


async def test_a_request_alone_with_nothing_unanswered_leaves_at_once(persister):
    batcher = batcher_for(persister)
    first = send(batcher, "a")
    await turns()
    assert persister.rooms_sent() == [["a"]]
    persister.exchanges[0].answer_ok()
    await first


async def test_waiting_requests_that_add_up_to_a_large_exchange_leave_without_waiting(persister):
    batcher = batcher_for(persister, small_exchange_bytes=3 * len(SMALL))
    send(batcher, "a")
    await turns()
    for room in "bcd":
        send(batcher, room)
        await turns()
    assert persister.rooms_sent() == [["a"], ["b", "c", "d"]]


async def test_an_unanswered_large_exchange_holds_back_no_one(persister):
    batcher = batcher_for(persister, small_exchange_bytes=len(SMALL) + 1)
    send(batcher, "big", SMALL + b" ")
    await turns()
    send(batcher, "a")
    await turns()
    send(batcher, "b")
    await turns()
    assert persister.rooms_sent() == [["big"], ["a"]]  # "a" is small and unanswered


async def test_holding_back_can_be_turned_off(persister):
    batcher = batcher_for(persister, max_small_exchanges=0)
    for room in "abc":
        send(batcher, room)
        await turns()
    assert persister.rooms_sent() == [["a"], ["b"], ["c"]]


async def test_more_small_exchanges_may_be_allowed_at_once(persister):
    batcher = batcher_for(persister, max_small_exchanges=2)
    for room in "abcd":
        send(batcher, room)
        await turns()
    assert persister.rooms_sent() == [["a"], ["b"]]
    persister.exchanges[1].answer_ok()
    await turns()
    assert persister.rooms_sent() == [["a"], ["b"], ["c", "d"]]


async def test_a_request_that_waited_leaves_with_only_what_remains_of_its_timeout(persister):
    batcher = batcher_for(persister)
    send(batcher, "a")
    await turns()
    send(batcher, "b", timeout_s=1.0)
    await asyncio.sleep(0.3)
    persister.exchanges[0].answer_ok()
    await turns()
    assert persister.rooms_sent() == [["a"], ["b"]]
    assert persister.exchanges[1].timeout_s == pytest.approx(0.7, abs=0.1)


async def test_a_request_that_waited_out_its_timeout_is_never_sent(persister):
    batcher = batcher_for(persister)
    first = send(batcher, "a", timeout_s=0.2)
    await turns()
    late = send(batcher, "b", timeout_s=0.1)
    with pytest.raises(TimeoutError):
        await late
    with pytest.raises(TimeoutError):
        await first  # its exchange was never answered
    await turns()
    assert persister.rooms_sent() == [["a"]]


async def test_a_waiting_request_whose_caller_gives_up_is_dropped(persister):
    batcher = batcher_for(persister)
    send(batcher, "a")
    await turns()
    gone = send(batcher, "b")
    send(batcher, "c")
    await turns()
    gone.cancel()
    await turns()
    persister.exchanges[0].answer_ok()
    await turns()
    assert persister.rooms_sent() == [["a"], ["c"]]


async def test_closing_ends_requests_still_waiting(persister):
    batcher = batcher_for(persister)
    send(batcher, "a")
    await turns()
    waiting = send(batcher, "b")
    await turns()
    await batcher.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert persister.rooms_sent() == [["a"]]
