"""Resharding while creators keep sending (issue 5), against real processes.

Each test starts three `persister run` processes (the map names two of
them), sends the harness workload through `PersisterClient` with every room
always having a request in flight, and changes the pool under that load.
Then, whatever happened:

- every acknowledged event is stored exactly once;
- every event was written by its room's owner under the epoch in force at
  its commit (the epoch whose `(sequence_at_start, next start]` range holds
  its ordering);
- the DAG tables follow from the stored events;
- no writer ever committed an event at or below a position it (or a peer,
  for it) had announced: the stream promise of contract section 6;
- a reshard's SHARDMAP reached the channel before any position covering a
  new writer's first event, and a map-following `StreamReader` delivered
  every event once, in order, with a minimum that never went back;
- callers saw no error, and rooms resumed: the gaps are reported (printed)
  for rooms that moved and rooms that did not.

The short form (~15 s each) runs in `make test`; `-m slow` runs the longer
form and checks the issue's targets (see `persister.bench.reshard_load`,
which also runs one scenario from the command line).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from persister.bench.reshard_load import (
    NAMES,
    RunResult,
    Scenario,
    StepFigures,
    format_report,
    run_scenario,
    scenario,
    workload_for,
)
from persister.bench.workload import Workload
from persister.devservices import Services

SHORT_S = 6.0
LONG_S = 30.0
ROOMS = 24
LONG_ROOMS = 64
# Events/s the generated workload lasts at. Three persisters on this 2-core
# box take 8-11k in the closed loop (9,000 ran dry in a 30 s run).
RATE_HINT = 16000.0
# The long form's rooms must also outlast a room pinned alone on a writer,
# which goes several times faster than the rest: at 16,000 the busiest room
# ran dry just before its unpin on a fast day.
LONG_RATE_HINT = 24000.0
# Short form: a loose bound that only a stuck room breaks on a busy CI box.
SHORT_PAUSE_LIMIT_MS = 2500.0
# The targets, checked in the long form: moved rooms pause at most
# this long (p99). The others never wait on the reshard (test_reshard.py
# shows it lock by lock); what they show under load is the machine's noise,
# plus the CPU the reshard's own work takes from a saturated 2-core box, so
# the long form checks it against the control figures (random instants away
# from steps) with one request's worth of slack.
TARGET_PAUSE_P99_MS = 250.0

P1, P2, P3 = NAMES


@pytest.fixture(scope="module")
def short_workload() -> Workload:
    return workload_for(SHORT_S + 3, RATE_HINT, ROOMS)


@pytest.fixture(scope="module")
def long_workload(request: pytest.FixtureRequest) -> Workload:
    # Marked slow, the long form also runs in a plain `pytest` (as `make
    # test` does); it only runs when asked for by name.
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the long form runs with -m slow")
    return workload_for(LONG_S + 3, LONG_RATE_HINT, LONG_ROOMS, seed=11)


async def run(
    services: Services, tmp_path: Path, chosen: Scenario, workload: Workload, *, follow: bool
) -> RunResult:
    result = await run_scenario(
        chosen,
        workload,
        server_url=services.database_url,
        redis_url=services.redis_url,
        folder=tmp_path,
        follow_redis=follow,
    )
    print(format_report(result.report))  # the figures, with -s or on failure
    return result


def assert_nothing_broken(result: RunResult, *, writers_added: bool = True) -> None:
    for check in result.checks:
        assert check.ok, str(check)
        if writers_added or "new writer" not in check.name:
            assert check.checked > 0, f"{check.name}: nothing was checked"
    report = result.report
    assert report.client_errors == {}
    assert report.requests_left > 0, "the workload ran dry before the load ended"
    assert report.throughput_events_per_s.after > 0


def assert_rooms_resumed(step: StepFigures, limit_ms: float) -> None:
    for label, gaps in (("moved", step.moved), ("unmoved", step.unmoved)):
        assert gaps.stalled == 0, f"{step.step}: {gaps.stalled} {label} rooms never resumed"
        if gaps.rooms:
            assert gaps.pause_p99_ms <= limit_ms, f"{step.step}: {label} rooms paused {gaps}"


def reshards(result: RunResult) -> list[StepFigures]:
    return [s for s in result.report.steps if s.epoch is not None]


# -- short form -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sharding", "follow"),
    [("sha256", False), ("rendezvous", True)],
    ids=["sha256-learning-from-421", "rendezvous-following-redis"],
)
async def test_growing_from_two_writers_to_three_and_back(
    services: Services, tmp_path: Path, short_workload: Workload, sharding: str, follow: bool
) -> None:
    result = await run(
        services, tmp_path, scenario("grow-shrink", sharding, SHORT_S),  # type: ignore[arg-type]
        short_workload, follow=follow,
    )  # fmt: skip
    assert_nothing_broken(result)
    grow, shrink = reshards(result)
    assert grow.rooms_moved > 0 and shrink.rooms_moved > 0
    for step in (grow, shrink):
        assert_rooms_resumed(step, SHORT_PAUSE_LIMIT_MS)
    assert result.report.reader_writer_sets == [[P1, P2], [P1, P2, P3], [P1, P2]]


async def test_pinning_a_busy_room_to_an_idle_writer_and_unpinning_it(
    services: Services, tmp_path: Path, short_workload: Workload
) -> None:
    result = await run(
        services, tmp_path, scenario("pin-unpin", "rendezvous", SHORT_S), short_workload,
        follow=True,
    )  # fmt: skip
    assert_nothing_broken(result)
    pin, unpin = reshards(result)
    assert pin.rooms_moved == unpin.rooms_moved == 1
    assert pin.moved.rooms == 1  # the room was sending when it moved
    for step in (pin, unpin):
        assert_rooms_resumed(step, SHORT_PAUSE_LIMIT_MS)
    assert result.report.reader_writer_sets[:2] == [[P1, P2], [P1, P2, P3]]


async def test_epoch_changes_that_move_no_room_keep_every_room_going(
    services: Services, tmp_path: Path, short_workload: Workload
) -> None:
    # Every writer finds each new epoch in a write transaction begun under
    # the old one and carries on under the new one (no rollback, no 421).
    result = await run(
        services, tmp_path, scenario("no-move", "rendezvous", SHORT_S), short_workload,
        follow=True,
    )  # fmt: skip
    assert_nothing_broken(result, writers_added=False)
    for step in reshards(result):
        assert step.rooms_moved == 0 and step.moved.rooms == 0
        assert_rooms_resumed(step, SHORT_PAUSE_LIMIT_MS)
    assert result.report.client_redirects == 0


async def test_moving_a_killed_writers_rooms_away_and_taking_it_back_after_its_restart(
    services: Services, tmp_path: Path, short_workload: Workload
) -> None:
    result = await run(
        services, tmp_path, scenario("kill-reshard", "sha256", SHORT_S), short_workload,
        follow=True,
    )  # fmt: skip
    assert_nothing_broken(result)
    kill, away, restart, back = result.report.steps
    # Rooms on the dead writer wait for the reshard (or its restart), no longer.
    assert kill.unmoved.stalled == 0
    assert away.rooms_moved > 0 and back.rooms_moved > 0
    assert_rooms_resumed(back, SHORT_PAUSE_LIMIT_MS)
    # The dead writer left the readers' set (a peer announced for it), then came back.
    sets = result.report.reader_writer_sets
    assert sets[:3] == [[P1, P2], [P1, P2, P3], [P1, P3]] and sets[-1] == [P1, P2]
    killed = [code for name, code in result.pool_exits if name == P2]
    assert killed[0] == -9 and killed[-1] == 0


# -- long form --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "sharding"),
    [("grow-shrink", "rendezvous"), ("grow-shrink", "sha256"), ("pin-unpin", "rendezvous"),
     ("kill-reshard", "rendezvous"), ("no-move", "rendezvous")],
)  # fmt: skip
async def test_the_long_run_meets_the_pause_targets(
    services: Services, tmp_path: Path, long_workload: Workload, name: str, sharding: str
) -> None:
    chosen = scenario(name, sharding, LONG_S)  # type: ignore[arg-type]
    result = await run(services, tmp_path, chosen, long_workload, follow=True)
    assert_nothing_broken(result, writers_added=name != "no-move")
    for step in reshards(result):
        assert step.moved.stalled == step.unmoved.stalled == 0
        if name == "pin-unpin":  # the busiest room, measured only while it has work
            assert step.moved.rooms == 1, f"{step.step}: the room ran out of requests"
        if name == "kill-reshard" and step is result.report.steps[1]:
            # Its moved rooms were stalled by the SIGKILL: the move is
            # answerable only for how soon they resumed.
            assert step.moved.resume_p99_ms <= TARGET_PAUSE_P99_MS, f"{step.step}: {step.moved}"
            continue
        if step.moved.rooms:
            assert step.moved.pause_p99_ms <= TARGET_PAUSE_P99_MS, f"{step.step}: {step.moved}"
        noise = result.report.control.pause_p99_ms + result.report.baseline.gap_p50_ms
        assert step.unmoved.pause_p50_ms <= noise, f"{step.step}: {step.unmoved}"
    if name == "grow-shrink" and sharding == "rendezvous":
        share = result.report.synthetic_moved_share_2_to_3["rendezvous"]
        assert math.isclose(share, 1 / 3, abs_tol=0.01)
