"""Issue 7, item 4: a flood larger than a persister can absorb.

One persister with a queue budget of QUEUED_EVENTS events. First its
throughput is measured with a closed loop that keeps it busy without
overfilling it (the baseline). Then FLOOD_CONNECTIONS senders each push
their rooms' requests as fast as they can, resending a refused request
after 50 ms whatever Retry-After says (a hostile creator), so that far more
is offered than the budget holds. What must hold:

- the excess is refused with 503 and a Retry-After header, nothing else
  (no 500, no 413, no dropped connection);
- no request hangs: every answer comes within BOUND_S;
- memory stays bounded: the process's peak RSS (VmHWM in /proc) stays
  under RSS_LIMIT_MB however long the flood lasts;
- throughput stays near the maximum: events acknowledged per second during
  the flood at least MIN_THROUGHPUT_RATIO of the baseline;
- everything acknowledged is stored exactly once, all-or-nothing.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from persister.bench.workload import BenchRequest
from persister.client import ClientOptions, PersisterClient
from tests.faults import checks
from tests.faults.fleet import Fleet, write_config
from tests.faults.load import Deadline, Ledger, drive, workload
from tests.faults.scenario import Prober
from tests.faults.watchers import watching

QUEUED_EVENTS = 4000
QUEUED_BYTES = 16 * 1024 * 1024
BATCH = 100  # events per request: 300 connections offer ~30,000 events at once
FLOOD_CONNECTIONS = 300
BOUND_S = 30.0
RSS_LIMIT_MB = 400
MIN_THROUGHPUT_RATIO = 0.5
# Events/s this machine's persister reaches at most; sizes the workload.
EXPECTED_MAX_RATE = 12_000


@dataclass(frozen=True)
class Form:
    baseline_s: float
    flood_s: float


FORMS = [
    pytest.param(Form(baseline_s=2, flood_s=5), id="short"),
    pytest.param(
        Form(baseline_s=10, flood_s=60),
        id="long",
        marks=[pytest.mark.slow, pytest.mark.timeout(600)],
    ),
]


@dataclass
class FloodReport:
    baseline_events_per_s: float = 0.0  # the mean of before and after the flood
    flood_events_per_s: float = 0.0
    ratio: float = 0.0
    answers: dict[str, int] | None = None
    max_answer_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0  # VmHWM: the highest RSS the process ever had
    rss_last_mb: float = 0.0


@pytest.mark.parametrize("form", FORMS)
async def test_a_flood_is_refused_with_503_while_memory_and_throughput_hold(
    form: Form, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, database_url, redis_url, ["flooded"],
        {"persist": {"max_queued_events": QUEUED_EVENTS, "max_queued_bytes": QUEUED_BYTES}},
    )  # fmt: skip
    fleet = Fleet(tmp_path, config)
    run = secrets.token_hex(3)
    # The baseline is measured before and after the flood (the tables grow,
    # and the machine is shared): the flood is compared with their mean.
    base_events = int(EXPECTED_MAX_RATE * form.baseline_s * 1.2)
    before = workload(base_events, 200, f"before{run}", workers=2, batch=BATCH)
    after = workload(base_events, 200, f"after{run}", workers=2, batch=BATCH, seed=5)
    # As many rooms as connections, all equally busy: every request is BATCH events.
    flood_work = workload(
        int(EXPECTED_MAX_RATE * form.flood_s * 1.5), FLOOD_CONNECTIONS, f"flood{run}",
        workers=2, batch=BATCH, seed=3, zipf_s=0.0,
    )  # fmt: skip
    report = FloodReport()
    ledger = Ledger()
    rss: list[int] = []
    try:
        await fleet.start_all()
        client = PersisterClient.from_config(
            fleet.config, options=ClientOptions(request_timeout_s=BOUND_S, deadline_s=120)
        )
        async with client:
            rate_before = await _closed_loop(client, before.requests, ledger, form.baseline_s)
            report.rss_before_mb = fleet.memory_kb("flooded")[0] / 1024
            flood = Prober(
                client, fleet, flood_work.requests, ledger,
                rooms_at_once=FLOOD_CONNECTIONS, bound_s=BOUND_S, pause_s=0.05,
            )  # fmt: skip
            sampler = asyncio.create_task(_sample_rss(fleet, rss))
            began = time.time()
            await flood.run(Deadline(began + form.flood_s))
            ended = time.time()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            rate_after = await _closed_loop(client, after.requests, ledger, form.baseline_s)
        report.baseline_events_per_s = (rate_before + rate_after) / 2
        report.flood_events_per_s = ledger.acknowledged_between(began, ended) / (ended - began)
        report.ratio = report.flood_events_per_s / report.baseline_events_per_s
        report.answers = dict(Counter(str(a.status) for a in flood.answers))
        report.max_answer_s = max(a.took for a in flood.answers)
        report.rss_last_mb = fleet.memory_kb("flooded")[0] / 1024
        report.rss_peak_mb = fleet.memory_kb("flooded")[1] / 1024
        codes = await fleet.stop_all()
    finally:
        fleet.close()
    stored = await checks.load_stored(database_url)
    requests = before.requests + flood_work.requests + after.requests
    verdict = checks.judge(ledger, requests, stored, [], None)
    figures = {**asdict(report), "rss_sampled_max_mb": max(rss, default=0) / 1024,
               "verdict": asdict(verdict)}  # fmt: skip
    print("\nbackpressure:", json.dumps(figures, indent=1))

    assert codes == {"flooded": 0}
    assert verdict.problems == [] and verdict.lost == 0 and verdict.duplicated == 0
    assert flood.problems() == []  # only 200 and 503-with-Retry-After, none after BOUND_S
    assert report.answers.get("503", 0) > report.answers.get("200", 0) // 10, "it was a flood"
    assert report.rss_peak_mb < RSS_LIMIT_MB
    assert report.ratio >= MIN_THROUGHPUT_RATIO, report


async def _closed_loop(
    client: PersisterClient, requests: list[BenchRequest], ledger: Ledger, seconds: float
) -> float:
    """Events/s acknowledged by a closed loop that keeps the persister busy
    without overfilling its queues."""
    started = time.time()
    await drive(client, requests, ledger, concurrency=24, until=Deadline(started + seconds))
    return ledger.acknowledged_between(started, time.time()) / (time.time() - started)


async def _sample_rss(fleet: Fleet, out: list[int]) -> None:
    started = time.monotonic()
    while watching(started):  # or until cancelled
        out.append(fleet.memory_kb("flooded")[0])
        await asyncio.sleep(0.1)
