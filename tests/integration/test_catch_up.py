"""The catch-up API (`GET /_persist/v1/streams/events`) and a reader that uses it.

Rows are written straight into `events` where a test needs exact orderings;
the persister serving the API reads them back like any other rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from psycopg import AsyncConnection

from persister.replication.catchup import CATCH_UP_PATH, CatchUpClient, CatchUpRejected
from persister.replication.reader import StreamReader
from tests.fixtures.persister import AUTH, SECRET, RoomBuilder, body, envelope, events_path
from tests.integration.stream_writers import collect, connect, event_row, insert_events

Client = TestClient[Any, Any]


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[AsyncConnection[Any]]:
    async with await connect(database_url) as conn:
        yield conn


async def get_rows(api: Client, headers: dict[str, str] | None = None, **params: Any) -> Any:
    query = {key.rstrip("_"): str(value) for key, value in params.items()}
    headers = AUTH if headers is None else headers
    response = await api.get(CATCH_UP_PATH, params=query, headers=headers)
    return response.status, await response.json()


def orderings_of(answer: Any) -> list[int]:
    return [row["stream_ordering"] for row in answer["rows"]]


# -- the API --------------------------------------------------------------------


async def test_rows_after_from_up_to_and_including_to_come_in_stream_order(
    api: Client, conn: AsyncConnection[Any]
) -> None:
    await insert_events(conn, "w1", [3, 1, 5, 2, 4])
    status, answer = await get_rows(api, from_=1, to=4)
    assert status == 200, answer
    assert orderings_of(answer) == [2, 3, 4]
    assert answer["limited"] is False and answer["to"] == 4
    row = event_row(2, "w1")
    assert answer["rows"][0] == {
        "stream_ordering": 2, "event_id": row.event_id, "room_id": row.room_id,
        "type": row.type, "state_key": None, "sender": row.sender,
    }  # fmt: skip


async def test_a_limited_answer_ends_at_its_last_row_where_the_next_call_continues(
    api: Client, conn: AsyncConnection[Any]
) -> None:
    await insert_events(conn, "w1", [1, 2, 4, 7, 9])
    _, first = await get_rows(api, from_=0, to=9, limit=2)
    assert (orderings_of(first), first["limited"], first["to"]) == ([1, 2], True, 2)
    _, second = await get_rows(api, from_=first["to"], to=9, limit=2)
    assert (orderings_of(second), second["limited"], second["to"]) == ([4, 7], True, 7)
    _, last = await get_rows(api, from_=second["to"], to=9, limit=2)
    assert (orderings_of(last), last["limited"], last["to"]) == ([9], False, 9)
    _, exact = await get_rows(api, from_=0, to=4, limit=3)  # exactly `limit` rows: not limited
    assert (orderings_of(exact), exact["limited"], exact["to"]) == ([1, 2, 4], False, 4)


async def test_limit_defaults_to_100_and_is_capped_at_1000(
    api: Client, conn: AsyncConnection[Any]
) -> None:
    await insert_events(conn, "w1", list(range(1, 1202)))
    _, default = await get_rows(api, from_=0, to=2000)
    assert (len(default["rows"]), default["limited"], default["to"]) == (100, True, 100)
    _, capped = await get_rows(api, from_=0, to=2000, limit=5000)
    assert (len(capped["rows"]), capped["limited"], capped["to"]) == (1000, True, 1000)


async def test_backfilled_events_are_not_part_of_the_forward_stream(
    api: Client, conn: AsyncConnection[Any]
) -> None:
    await insert_events(conn, "w1", [-2, -1, 1])
    _, answer = await get_rows(api, from_=0, to=10)
    assert orderings_of(answer) == [1]


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"to": "5"}, "from"),
        ({"from": "0"}, "to"),
        ({"from": "x", "to": "5"}, "from"),
        ({"from": "1.5", "to": "5"}, "from"),
        ({"from": "-1", "to": "5"}, "from"),
        ({"from": "0", "to": " 5"}, "to"),
        ({"from": "0", "to": "99999999999999999999"}, "to"),
        ({"from": "6", "to": "5"}, "to"),
        ({"from": "0", "to": "5", "limit": "0"}, "limit"),
        ({"from": "0", "to": "5", "limit": "-3"}, "limit"),
        ({"from": "0", "to": "5", "limit": "many"}, "limit"),
    ],
)
async def test_bad_parameters_answer_400_naming_the_parameter(
    api: Client, query: dict[str, str], named: str
) -> None:
    response = await api.get(CATCH_UP_PATH, params=query, headers=AUTH)
    answer = await response.json()
    assert response.status == 400, answer
    assert answer["errcode"] == "M_INVALID_PARAM"
    assert named in answer["error"]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"}]
)
async def test_the_replication_secret_is_required(api: Client, headers: dict[str, str]) -> None:
    status, answer = await get_rows(api, headers=headers, from_=0, to=5)
    assert status == 401, answer


async def test_a_lost_database_connection_answers_503_and_the_next_call_reconnects(
    api: Client, conn: AsyncConnection[Any]
) -> None:
    await insert_events(conn, "w1", [1])
    assert (await get_rows(api, from_=0, to=1))[0] == 200
    await conn.execute(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE '%:catch-up'"
    )
    response = await api.get(CATCH_UP_PATH, params={"from": "0", "to": "1"}, headers=AUTH)
    assert response.status == 503 and "Retry-After" in response.headers
    status, answer = await get_rows(api, from_=0, to=1)
    assert (status, orderings_of(answer)) == (200, [1])


# -- a reader catching up over the API --------------------------------------------

ReaderFactory = Callable[..., Awaitable[StreamReader]]


@pytest.fixture
async def make_reader(
    redis_url: str, redis_channel: str, database_url: str
) -> AsyncIterator[ReaderFactory]:
    readers: list[StreamReader] = []

    async def make(**options: Any) -> StreamReader:
        reader = StreamReader(redis_url, redis_channel, database_url, ["persister1"], **options)
        await reader.start()
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        await reader.close()


async def persist_history(api: Client, events: int) -> list[int]:
    """`events` events of one room through the persist API; their orderings."""
    room = RoomBuilder()
    orderings: list[int] = []
    while len(orderings) < events:
        pdus = [room.event()[1] for _ in range(min(200, events - len(orderings)))]
        response = await api.post(
            events_path(room.room_id), data=body("10", *map(envelope, pdus)), headers=AUTH
        )
        answer = await response.json()
        assert response.status == 200, answer
        orderings += [result["stream_ordering"] for result in answer["results"]]
    return orderings


def base_url(api: Client) -> str:
    return str(api.make_url("/"))


async def test_a_reader_reads_history_over_the_api_instead_of_the_tables(
    api: Client, make_reader: ReaderFactory
) -> None:
    history = await persist_history(api, 1200)  # more than one stretch of 500
    reader = await make_reader(from_position=0, catch_up_url=base_url(api), catch_up_secret=SECRET)
    rows = await collect(reader, len(history))
    assert [row.stream_ordering for row in rows] == history
    assert reader.catch_up_reads >= 3 and reader.database_reads == 0


async def test_a_reader_fails_over_to_the_next_persister_url(
    api: Client, make_reader: ReaderFactory
) -> None:
    history = await persist_history(api, 3)
    nobody = "http://127.0.0.1:9/"  # the discard port: connection refused
    reader = await make_reader(
        from_position=0, catch_up_url=[nobody, base_url(api)], catch_up_secret=SECRET
    )
    rows = await collect(reader, len(history))
    assert [row.stream_ordering for row in rows] == history


async def test_a_refused_catch_up_call_is_raised_to_the_consumer(
    api: Client, make_reader: ReaderFactory
) -> None:
    await persist_history(api, 1)
    reader = await make_reader(from_position=0, catch_up_url=base_url(api), catch_up_secret="wrong")
    # Generous: on a loaded machine the first announcement may come late.
    with pytest.raises(CatchUpRejected, match="401"):
        await collect(reader, 1, timeout=30)


async def test_a_catch_up_url_without_the_secret_is_a_usage_error(
    redis_url: str, redis_channel: str, database_url: str
) -> None:
    with pytest.raises(ValueError, match="catch_up_secret"):
        StreamReader(
            redis_url, redis_channel, database_url, ["persister1"], catch_up_url="http://x/"
        )


# -- the client refuses answers it cannot trust ---------------------------------------


@contextlib.asynccontextmanager
async def answering(payload: dict[str, Any]) -> AsyncIterator[str]:
    """A stand-in persister that answers every catch-up call with `payload`."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(payload)

    app = web.Application()
    app.router.add_get(CATCH_UP_PATH, handler)
    async with TestServer(app) as server:
        yield str(server.make_url("/"))


def wire_row(ordering: int) -> dict[str, Any]:
    row = event_row(ordering, "w1")
    return {
        "stream_ordering": ordering, "event_id": row.event_id, "room_id": row.room_id,
        "type": row.type, "state_key": None, "sender": row.sender,
    }  # fmt: skip


@pytest.mark.parametrize(
    "payload",
    [
        {"rows": [], "limited": False, "to": 7},  # stops short without saying "limited"
        {"rows": [wire_row(3)], "limited": True, "to": 5},  # "to" beyond its last row
        {"rows": [wire_row(12)], "limited": False, "to": 10},  # a row above "to"
        {"rows": [wire_row(4), wire_row(3)], "limited": False, "to": 10},  # out of order
        {"rows": [wire_row(2)], "limited": False, "to": 10},  # a row at or below "from"
        {"rows": "none", "limited": False, "to": 10},  # not the answer's shape
    ],
)
async def test_an_answer_that_could_make_a_reader_skip_rows_is_refused(
    payload: dict[str, Any],
) -> None:
    async with answering(payload) as url:
        client = CatchUpClient([url], SECRET)
        try:
            with pytest.raises(CatchUpRejected):
                await client.rows_between(2, 10, 100)
        finally:
            await client.close()


async def test_a_consistent_answer_is_taken_as_given() -> None:
    payload = {"rows": [wire_row(3), wire_row(5)], "limited": True, "to": 5}
    async with answering(payload) as url:
        client = CatchUpClient([url], SECRET)
        try:
            rows, upto = await client.rows_between(2, 10, 2)
        finally:
            await client.close()
    assert ([row.stream_ordering for row in rows], upto) == ([3, 5], 5)
