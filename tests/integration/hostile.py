"""Helpers for the hostile-input and fuzz tests: a persister served with the
production HTTP limits, a raw HTTP/1.1 exchange that can send anything
(lying Content-Length, invalid bytes, stalls), and a snapshot of every
contract table to prove a refused request wrote nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
from aiohttp import web
from psycopg import sql

from persister.devservices import Services
from persister.http.app import build_app
from persister.server import HTTP_SERVER_SETTINGS, build_writer
from persister.storage.migrate import with_database
from persister.writer.service import Writer
from tests.fixtures.db import Maintenance, drop_database, new_database_name
from tests.fixtures.persister import SECRET, make_config

# The tables of contract section 5 that requests write, plus `rooms`.
# `stream_positions` is left out: the writer's heartbeat rewrites it on its
# own clock, whatever the requests do.
DATA_TABLES = (
    "rooms",
    "events",
    "event_json",
    "event_edges",
    "event_auth",
    "event_forward_extremities",
    "event_backward_extremities",
    "rejections",
)

# The production limits, with the two timeouts shortened so that the
# slow-loris cases take seconds, not minutes.
TEST_BODY_TIMEOUT_S = 1.0
TEST_KEEPALIVE_S = 1.5
MAX_BODY = 1024 * 1024
MAX_EVENTS = 200


@contextlib.contextmanager
def cloned_database(
    services: Services, maintenance: Maintenance, template_database: str
) -> Iterator[str]:
    """A fresh migrated database, for fixtures wider than one test (as tests.fixtures.db)."""
    name = new_database_name()
    maintenance.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template_database)
        )
    )
    try:
        yield with_database(services.database_url, name)
    finally:
        drop_database(maintenance, name)


@contextlib.asynccontextmanager
async def running_writer(database_url: str, redis_url: str) -> AsyncIterator[Writer]:
    channel = f"persister.test.{secrets.token_hex(6)}"
    writer = build_writer(make_config(database_url, redis_url, channel), "persister1")
    await writer.start()
    try:
        yield writer
    finally:
        await writer.drain(5)
        await writer.stop()


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@contextlib.asynccontextmanager
async def served(
    writer: Writer, *, max_body: int = MAX_BODY, max_events: int = MAX_EVENTS
) -> AsyncIterator[Endpoint]:
    """The app served as `persister run` serves it (an AppRunner with
    HTTP_SERVER_SETTINGS and no handler cancellation, unlike aiohttp's
    TestServer), on a free loopback port."""
    app = build_app(
        writer, SECRET, max_body=max_body, max_events=max_events,
        body_timeout_s=TEST_BODY_TIMEOUT_S,
    )  # fmt: skip
    settings = {**HTTP_SERVER_SETTINGS, "keepalive_timeout": TEST_KEEPALIVE_S}
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **settings)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield Endpoint(host, port)
    finally:
        await runner.cleanup()


_SNAPSHOT = sql.SQL(" UNION ALL ").join(
    sql.SQL(
        "SELECT {name}, count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
        " FROM {table} t"
    ).format(name=sql.Literal(name), table=sql.Identifier(name))
    for name in DATA_TABLES
)


async def snapshot(conn: psycopg.AsyncConnection[Any]) -> dict[str, tuple[int, str]]:
    """Row count and a checksum of every row, per table."""
    cur = await conn.execute(_SNAPSHOT)
    return {name: (count, digest) for name, count, digest in await cur.fetchall()}


def row_counts(state: dict[str, tuple[int, str]]) -> dict[str, int]:
    return {name: count for name, (count, _) in state.items()}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float
    # The server closed the connection (EOF) after, or instead of, answering.
    closed: bool = False
    json: Any = field(default=None)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def request_bytes(
    path: str | bytes,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    method: str = "POST",
    content_length: int | None = None,
    extra_head: bytes = b"",
) -> bytes:
    """An HTTP/1.1 request exactly as given (the path is sent as is, undecoded)."""
    target = path if isinstance(path, bytes) else path.encode("latin-1")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: persister.test"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}".encode("latin-1"))
    if content_length is None:
        content_length = len(body)
    if content_length >= 0:
        lines.append(b"Content-Length: %d" % content_length)
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n" + extra_head + b"\r\n" + body


async def exchange(
    server: Endpoint, raw: bytes, *, timeout_s: float = 15.0, check_closed: bool = False
) -> Answer:
    """Send `raw` on a new connection and read one answer.

    The client never sends more than `raw`, so a request that promises more
    body than it carries is a stalled (slow-loris) client. `check_closed`
    waits up to a second after the answer to see whether the server hangs up.
    """
    reader, writer = await asyncio.open_connection(server.host, server.port)
    started = time.monotonic()
    try:
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), timeout_s)
        answer.seconds = time.monotonic() - started
        if check_closed and answer.status:
            try:
                answer.closed = await asyncio.wait_for(reader.read(1), 1.0) == b""
            except TimeoutError:
                answer.closed = False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:  # the server hung up without a word
            return Answer(0, {}, b"", 0.0, closed=True)
        raise AssertionError(f"half an HTTP answer: {exc.partial[:200]!r}") from None
    status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise AssertionError(f"no HTTP answer, got {head[:200]!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    answer = Answer(int(parts[1]), headers, body, 0.0)
    if headers.get("content-type", "").startswith("application/json"):
        answer.json = msgspec.json.decode(body)
    return answer


def auth_headers(content_type: str | None = "application/json") -> dict[str, str]:
    headers = {"Authorization": f"Bearer {SECRET}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers
