"""Issue 7, item 1: persisters SIGKILLed at random moments and at chosen points
of the write path, under load, lose nothing acknowledged, duplicate nothing,
keep the DAG right and never announce a position ahead of a commit.

The tool and what it checks are described in `tests/faults/crash_loop.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from tests.faults.crash_loop import MODES, CrashSettings, run_crash_loop
from tests.faults.servers import PrivatePostgres

FORMS = [
    pytest.param(CrashSettings(seconds=15, folder=Path(), events=40_000, rooms=80), id="short"),
    # The opt-in lane setting makes a lane hold its COMMIT for another lane's:
    # killed anywhere, nothing may be lost, doubled or announced early either.
    pytest.param(
        CrashSettings(
            seconds=15,
            folder=Path(),
            events=40_000,
            rooms=80,
            config={"persist": {"commit_in_draw_order": True}},
        ),
        id="short-commit-in-draw-order",
    ),
    pytest.param(
        CrashSettings(
            seconds=300, folder=Path(), events=330_000, rooms=300, concurrency=32, rate=1000.0
        ),
        id="long",
        marks=[pytest.mark.slow, pytest.mark.timeout(1200)],
    ),
]


@pytest.mark.parametrize("form", FORMS)
async def test_nothing_acknowledged_is_lost_or_doubled_and_no_position_runs_ahead(
    form: CrashSettings, private_postgres: PrivatePostgres, redis_url: str, tmp_path: Path
) -> None:
    report = await run_crash_loop(replace(form, folder=tmp_path), private_postgres, redis_url)
    print("\ncrash loop:", json.dumps(asdict(report), indent=1))
    (tmp_path / "report.json").write_text(json.dumps(asdict(report), indent=1))

    figures = report.verdict
    assert report.problems == []
    assert figures.lost == 0 and figures.duplicated == 0 and figures.promise_violations == 0
    assert figures.commit_timestamps, (
        "the private cluster dates commits: every announcement checked"
    )
    assert figures.events_acknowledged > 1000
    assert figures.announcements > 100 and figures.reader_samples > 50
    # Every kind of kill happened, most of the hooks were reached.
    assert report.kills_total >= len(MODES)
    assert set(report.kills) == set(MODES)
    assert len(report.hooks_fired) >= 3, report.hooks_fired
    if report.hooks_fired.get("after_commit"):
        # Committed, then killed before answering: the client's resend was
        # told "duplicate" with the original orderings, and that was all it got.
        assert figures.answers_lost > 0
