"""The open loop's send delay: how late the harness itself let calls leave.

Latency counts from each call's scheduled time, so a harness that falls
behind its schedule adds to it; the phase reports that share apart. The
driver runs here against a stand-in for the client (the figure is the
harness's own, whatever answers), on a real event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

import pytest

from persister.bench import driver, report
from persister.bench.cpu import CpuReport
from persister.bench.stats import PhaseRecorder, summarise
from persister.bench.workload import WorkloadSpec, generate
from persister.wire import EventResult, PersistResponse, Position

STALL_S = 0.05


class _AnsweringClient:
    """Answers every call at once; the first call holds the event loop."""

    def __init__(self) -> None:
        self.calls = 0

    async def persist(
        self, room_id: str, room_version: str, events: Sequence[Any], backfilled: bool = False
    ) -> PersistResponse:
        self.calls += 1
        if self.calls == 1:
            time.sleep(STALL_S)  # a busy harness: nothing else runs meanwhile
        results = [EventResult(f"$e{self.calls}.{i}", self.calls, 1, False) for i in events]
        return PersistResponse(results, Position("bench1", self.calls))


def _run_open(rate: float, seconds: float) -> PhaseRecorder:
    workload = generate(WorkloadSpec(rooms=20, events=400, batch=1, seed=3))
    source = driver.RequestSource(workload.requests)

    async def main() -> PhaseRecorder:
        now = time.perf_counter()
        recorder = PhaseRecorder(now, now)  # no warm-up
        stop = driver.StopRule(now + seconds, None, recorder)
        client: Any = _AnsweringClient()
        await driver.run_open(
            source, client, stop, rate, 64, lambda done, response: None, random.Random(1), 1.0
        )
        return recorder

    return asyncio.run(main())


def test_open_loop_counts_how_late_a_stalled_harness_sent_its_calls() -> None:
    recorder = _run_open(rate=2000, seconds=0.3)
    assert len(recorder.send_delays) == recorder.requests > 0
    assert min(recorder.send_delays) >= 0.0
    # The calls scheduled during the stall could only leave after it.
    assert max(recorder.send_delays) >= STALL_S * 0.8


def test_send_delay_is_not_counted_for_calls_scheduled_in_the_warm_up() -> None:
    recorder = PhaseRecorder(started=100.0, measured_from=103.0)
    recorder.record_send_delay(intended=102.9, sent=103.5)
    recorder.record_send_delay(intended=103.1, sent=103.1005)
    recorder.record_send_delay(intended=104.0, sent=103.9999)  # a timer that woke early
    assert recorder.send_delays == [pytest.approx(0.0005), 0.0]


def _phase(mode: str, send_delay: list[float] | None) -> report.PhaseResult:
    empty = summarise([])
    cpu = CpuReport(1.0, {}, 0.0, 0.0, 0.0, 0.0, 0.0)
    return report.PhaseResult(
        name=mode, mode=mode, concurrency=None, target_events_per_s=None, offset_s=0.0,
        warmup_s=0.0, measured_s=1.0, requests=0, events=0, new_events=0, events_per_s=0.0,
        new_events_per_s=0.0, events_per_s_by_instance={}, ratio_to_ceiling=None,
        latency_ms=empty, stream_lag_ms=empty, lag_unseen=0, errors={}, request_sizes={},
        client={}, cpu=cpu, timeline=[],
        send_delay_ms=None if send_delay is None else summarise(send_delay),
    )  # fmt: skip


def _result(phases: list[report.PhaseResult]) -> report.RunResult:
    workload = generate(WorkloadSpec(rooms=2, events=4, batch=1)).summary
    return report.RunResult(
        version=1, command=[], started_at="", machine={}, workload_spec={}, workload=workload,
        generation_s=0.0, pool={}, ceiling=None, phases=phases, batch_sizes=None,
        verification=None,
    )  # fmt: skip


def test_table_shows_the_send_delay_under_open_phases_only() -> None:
    table = report.table(_result([_phase("closed", None), _phase("open", [0.001, 0.004])]))
    lines = table.splitlines()
    open_row = next(i for i, line in enumerate(lines) if line.startswith("open"))
    assert lines[open_row + 1].strip() == (
        "harness sent calls late by p50 1.0, p99 4.0, max 4.0 ms (included in the latency above)"
    )
    assert sum("harness sent calls late" in line for line in lines) == 1
