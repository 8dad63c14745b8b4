"""After a connection is lost during COMMIT (persister.writer.lane.Lane._settle_lost).

The transaction may have committed or not. Until the database says which,
its orderings stay unfinished, so the writer's position cannot pass them;
then the rows that did land are handed to the publisher, and only then do
the orderings finish. A database that is away is waited for; an error that
waiting cannot cure stops the lane (and the process) without finishing them.
"""

from __future__ import annotations

from typing import Any, cast

import psycopg
import pytest

from persister.liveness import BackendStillRunning
from persister.positions import WriterPositions
from persister.replication.messages import EventRow
from persister.writer import lane as lane_module
from persister.writer.lane import CommittedBatch, Lane, LaneSettings, SettleFailed
from persister.writer.queue import Budget

ROW = EventRow(5, "$e", "!r:test", "m.room.message", None, "@u:test")


def lane_with(
    settle_answers: list[BaseException | list[EventRow]],
) -> tuple[Lane, WriterPositions, list[CommittedBatch]]:
    """A lane whose settle() gives these answers in turn (raising the errors);
    orderings 5 and 6 drawn and unfinished, as after a lost COMMIT."""
    positions = WriterPositions("w1", 4)
    token = positions.begin_fetch()
    positions.end_fetch(token, [5, 6])
    committed: list[CommittedBatch] = []

    async def on_commit(batch: CommittedBatch) -> None:
        committed.append(batch)

    async def settle(backend_pid: int, orderings: list[int]) -> list[EventRow]:
        assert positions.position() == 4, "nothing may pass the unsettled orderings"
        answer = settle_answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    settings = LaneSettings("w1", "postgresql://unused", 100, 1.0)
    budget = Budget(100, 100_000, 0.5)
    unused = cast(Any, None)
    return (
        Lane(settings, positions, budget, unused, on_commit, settle, unused),
        positions,
        committed,
    )


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lane_module, "RECONNECT_INITIAL_S", 0.0)
    monkeypatch.setattr(lane_module, "RECONNECT_MAX_S", 0.0)


async def test_the_rows_that_landed_are_published_before_the_orderings_finish() -> None:
    lane, positions, committed = lane_with([[ROW]])
    await lane._settle_lost(1234, [5, 6])
    assert [b.events for b in committed] == [[ROW]]
    assert positions.position() == 6


async def test_while_the_database_is_away_the_position_waits_and_settling_is_retried() -> None:
    away = psycopg.OperationalError("connection refused")
    still = BackendStillRunning("backend 1234 did not end")
    lane, positions, committed = lane_with([away, away, still, []])
    await lane._settle_lost(1234, [5, 6])
    assert [b.events for b in committed] == [[]]
    assert positions.position() == 6


async def test_an_error_retrying_cannot_cure_stops_the_lane_with_the_orderings_unfinished() -> None:
    lane, positions, committed = lane_with([psycopg.errors.InsufficientPrivilege("no")])
    with pytest.raises(SettleFailed):
        await lane._settle_lost(1234, [5, 6])
    assert committed == [] and positions.position() == 4
