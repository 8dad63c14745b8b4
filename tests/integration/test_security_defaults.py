"""Security defaults of a running persister (issue 7, item 6): the secret is
required and compared in constant time, an empty secret is refused, and
`persister run` serves with the HTTP limits of persister.server."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import pytest_asyncio

from persister import server
from persister.config import ConfigError
from persister.devservices import Services
from persister.http.app import build_app
from persister.writer.service import Writer
from tests.fixtures.db import Maintenance
from tests.fixtures.persister import SECRET, RoomBuilder, body, envelope, events_path, make_config
from tests.integration.hostile import (
    cloned_database,
    exchange,
    request_bytes,
    running_writer,
    served,
)

# The secret tests share one persister (and the module's event loop).
shared_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def module_database(
    services: Services, maintenance: Maintenance, template_database: str
) -> Iterator[str]:
    with cloned_database(services, maintenance, template_database) as url:
        yield url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_writer(module_database: str, redis_url: str) -> AsyncIterator[Writer]:
    async with running_writer(module_database, redis_url) as writer:
        yield writer


@pytest.fixture
def compare_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every hmac.compare_digest call the HTTP layer makes (the real one still decides)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


@shared_loop
@pytest.mark.parametrize(
    "token",
    [SECRET, "wrong-secret", "x", "t" * 4096, "test-secreT", SECRET + " "],
    ids=["right", "wrong-same-length", "short", "long", "one-bit-off", "trailing-space"],
)
async def test_the_secret_is_compared_in_constant_time(
    shared_writer: Writer, compare_calls: list[tuple[bytes, bytes]], token: str
) -> None:
    """Right or wrong, of any length: the comparison is hmac.compare_digest
    of the given bytes against the secret's, never `==`."""
    room = RoomBuilder(room_id=f"!{token.strip()[:20]}:example.org")
    async with served(shared_writer) as server:
        answer = await exchange(server, request_bytes(
            events_path(room.room_id), body("10", envelope(room.event()[1])),
            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ))  # fmt: skip
    assert compare_calls == [(token.strip().encode(), SECRET.encode())]
    assert answer.status == (200 if token.strip() == SECRET else 401), answer.text


@shared_loop
@pytest.mark.parametrize(
    "header, errcode",
    [(None, "M_MISSING_TOKEN"), ("Bearer", "M_UNKNOWN_TOKEN"), ("Bearer ", "M_UNKNOWN_TOKEN"),
     (f"Basic {SECRET}", "M_UNKNOWN_TOKEN"), (SECRET, "M_UNKNOWN_TOKEN")],
)  # fmt: skip
async def test_a_persist_call_without_the_secret_is_401_before_its_body_is_read(
    shared_writer: Writer, header: str | None, errcode: str
) -> None:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers["Authorization"] = header
    async with served(shared_writer) as server:
        # A body that never arrives: a 401 must not wait for it.
        raw = request_bytes("/_persist/v1/rooms/%21r%3Ax/events", b"", headers, content_length=10)
        answer = await exchange(server, raw)
    assert answer.status == 401 and answer.json["errcode"] == errcode
    assert answer.seconds < 1.0


@pytest.mark.parametrize("secret", ["", "   ", "\n"])
def test_an_empty_secret_is_refused_at_start(secret: str) -> None:
    """Otherwise `Authorization: Bearer` with no token would match it.
    (Refused before the writer is even looked at.)"""
    with pytest.raises(ConfigError, match="secret is empty"):
        build_app(cast(Writer, None), secret, max_body=1024, max_events=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_persister_run_reads_the_secret_file_and_serves_with_the_http_limits(
    database_url: str,
    redis_url: str,
    redis_channel: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-the-file\n", encoding="utf-8")
    port = _free_port()
    config = make_config(
        database_url, redis_url, redis_channel,
        replication_secret=None, replication_secret_path=str(secret_file),
        instance_map={"persister1": {"host": "127.0.0.1", "port": port}},
    )  # fmt: skip
    stop = asyncio.Event()

    async def until_stopped(_failed: object) -> None:
        await stop.wait()

    monkeypatch.setattr(server, "_wait_for_termination", until_stopped)
    monkeypatch.setattr(server, "tune_garbage_collector", lambda: None)  # not in the test process
    # Everything as in production but a keepalive short enough to watch.
    monkeypatch.setattr(
        server, "HTTP_SERVER_SETTINGS", {**server.HTTP_SERVER_SETTINGS, "keepalive_timeout": 1.0}
    )
    caplog.set_level(logging.WARNING, logger="persister.server")
    running = asyncio.create_task(server.serve(config, "persister1"))
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await _until_healthy(http, base, running)
            room = RoomBuilder()
            data = body("10", envelope(room.event()[1]))
            path = base + events_path(room.room_id)
            json = {"Content-Type": "application/json"}
            async with http.post(
                path, data=data, headers=json | {"Authorization": "Bearer " + str(secret_file)}
            ) as wrong:
                assert wrong.status == 401
            async with http.post(
                path, data=data, headers=json | {"Authorization": "Bearer from-the-file"}
            ) as ok:
                assert ok.status == 200, await ok.text()
            async with http.get(base + "/health", headers={"X-Big": "a" * 9000}) as big:
                assert big.status == 400
        # Headers that never end: dropped after the (shortened) keepalive timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5.0) == b""
        writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    assert not [r for r in caplog.records if r.getMessage().startswith("SECURITY")]


async def _until_healthy(
    http: aiohttp.ClientSession, base: str, running: asyncio.Task[None]
) -> None:
    for _ in range(200):
        if running.done():
            running.result()  # raises what stopped it
        try:
            async with http.get(base + "/health") as answer:
                if answer.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("persister run never became healthy")
