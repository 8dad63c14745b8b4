"""Issue 7, item 3: Redis goes away under load.

A pool of two persisters and a StreamReader share a private Redis, which is
SIGKILLed for OUTAGE_S under load and then started again on the same port.
What must hold:

- persisting goes on meanwhile: every request is answered 200 (Redis only
  carries announcements; nothing waits for it);
- when Redis is back, each writer republishes: within REPUBLISH_BOUND_S
  the channel carries, from every writer, a position at or above every
  event committed while Redis was away;
- the reader resubscribes, catches up from the database, and hands out
  every committed event exactly once, in order; no announcement it heard
  ran ahead of a commit; nothing acknowledged is lost or doubled.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from tests.faults.checks import load_stored
from tests.faults.scenario import Scenario
from tests.faults.servers import PrivateRedis

REPUBLISH_BOUND_S = 3.0


@dataclass(frozen=True)
class Form:
    outage_s: float
    seconds: float


FORMS = [
    pytest.param(Form(outage_s=3.0, seconds=12), id="short"),
    pytest.param(
        Form(outage_s=10.0, seconds=25),
        id="long",
        marks=[pytest.mark.slow, pytest.mark.timeout(600)],
    ),
]


@pytest.mark.parametrize("form", FORMS)
async def test_persisting_goes_on_and_readers_miss_nothing_while_redis_is_away(
    form: Form, private_redis: PrivateRedis, database_url: str, tmp_path: Path
) -> None:
    down = up = 0.0
    committed_while_down = 0
    republished_s: dict[str, float | None] = {}

    async def redis_away(s: Scenario) -> None:
        nonlocal down, up, committed_while_down
        await asyncio.sleep(2.0)
        await asyncio.to_thread(private_redis.stop)
        down = time.time()
        await asyncio.sleep(form.outage_s)
        committed_while_down = (await load_stored(database_url)).max_ordering()
        await asyncio.to_thread(private_redis.start)
        up = time.time()
        deadline = up + REPUBLISH_BOUND_S + 2
        while time.time() < deadline and not _republished(
            s, up, committed_while_down, republished_s
        ):
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)

    async with Scenario(tmp_path, database_url, private_redis.url, seconds_hint=form.seconds) as s:
        await s.run(redis_away)
        assert s.watch is not None and s.prober is not None
        during = [a.status for a in s.prober.answers if down <= a.sent < up]
        acked_during = {n: s.ledger.first_answer_after(n, down) for n in s.fleet.names}
        subscriptions = s.watch.reader.subscriptions
        verdict = await s.finish()

    figures = {"outage_s": up - down, "committed_while_down": committed_while_down,
               "probe_answers_during": len(during), "republished_s": republished_s,
               "reader_subscriptions": subscriptions, "verdict": asdict(verdict)}  # fmt: skip
    print("\nredis faults:", json.dumps(figures, indent=1))

    assert verdict.problems == []
    assert verdict.lost == 0 and verdict.duplicated == 0 and verdict.promise_violations == 0
    # Persisting went on without Redis.
    assert during and set(during) == {200}, f"answers while Redis was away: {set(during)}"
    for name, first in acked_during.items():
        assert first is not None and first < up, f"{name} acknowledged nothing while Redis was away"
    # Positions republished, reader resubscribed and caught up (finish() checked it
    # delivered every committed row once, in order).
    for name, seconds in republished_s.items():
        assert seconds is not None and seconds < REPUBLISH_BOUND_S, (name, seconds)
    assert subscriptions >= 2


def _republished(s: Scenario, up: float, upto: int, out: dict[str, float | None]) -> bool:
    """Whether every writer announced a position >= `upto` after `up`."""
    for name in s.fleet.names:
        heard = [h.at for h in s.recorder.of(name) if h.at >= up and h.command.pos >= upto]
        out[name] = min(heard) - up if heard else None
    return all(v is not None for v in out.values())
