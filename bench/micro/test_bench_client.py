"""Micro-benchmark of an event creator's persist calls through `PersisterClient`.

Run: .venv/bin/python -m pytest bench/micro/test_bench_client.py --benchmark-only -q

64 calls of one event each for 64 rooms, made at once as a closed loop of
single events makes them (`persister bench --batch 1 --concurrency 64`):
they leave as one batch exchange. The persister is a bare aiohttp
application on loopback in the same process that answers every request of a
batch at once, so the figure is the client's own work per round (routing,
room lines, batching, HTTP both ways, decoding), not a persister's. Divide
by 64 for a call.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import uvloop
from aiohttp import web

from persister import wire
from persister.bench.workload import WorkloadSpec, generate
from persister.client import PersisterClient

CALLS = 64


async def _answer_batch(request: web.Request) -> web.Response:
    batch = wire.batch_request_decoder.decode(await request.read())
    answers = [wire.BatchAnswer(200, msgspec.Raw(_ANSWER)) for _ in batch.requests]
    return web.Response(
        body=wire.encoder.encode(wire.BatchResponse(answers)), content_type="application/json"
    )


_ANSWER = wire.encoder.encode(
    wire.PersistResponse(
        [wire.EventResult("$event", 1000, 10, False)], wire.Position("persister1", 1000)
    )
)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()  # as the harness and the persister run
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def client(loop: asyncio.AbstractEventLoop) -> Iterator[PersisterClient]:
    app = web.Application()
    app.router.add_post(wire.BATCH_PATH, _answer_batch)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]  # the one the system chose
    persister = PersisterClient(["persister1"], {"persister1": ("127.0.0.1", port)}, "secret")
    yield persister
    loop.run_until_complete(persister.close())
    loop.run_until_complete(runner.cleanup())


def test_bench_64_single_event_calls_in_one_exchange(
    benchmark: Any, loop: asyncio.AbstractEventLoop, client: PersisterClient
) -> None:
    spec = WorkloadSpec(rooms=CALLS * 2, events=CALLS * 8, batch=1, message_bytes=1024, zipf_s=0.0)
    single = [r for r in generate(spec).requests if len(r.events) == 1]
    # One event per room, sent again each round.
    events = dict(itertools.islice({r.room_id: r for r in single}.items(), CALLS))
    rounds = itertools.count()

    async def one_round() -> int:
        # A fresh room ID per call and round: a room's line never holds two calls.
        round_ = next(rounds)
        answers = await asyncio.gather(*(
            client.persist(f"{room}{round_}", r.room_version, r.envelopes)
            for room, r in events.items()
        ))  # fmt: skip
        return len(answers)

    assert len(events) == CALLS
    answered = benchmark(lambda: loop.run_until_complete(one_round()))
    assert answered == len(events)
    assert client.stats.batched > 0  # they did leave together
