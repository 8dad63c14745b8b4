"""The fault tests' judges, judged: each check finds what it is meant to find.

No servers: stored state, ledgers and announcements are made up here, so
that a fault test passing means something. (A run of the crash-loop scenario
against a persister sabotaged to announce before COMMIT fails every one of
the stream checks below; see the report of issue 7.)
"""

from __future__ import annotations

from persister.bench.workload import BenchRequest, GenEvent
from persister.replication.messages import EventRow, position_command, rdata_command
from persister.wire import EventResult
from tests.faults.checks import (
    Published,
    Stored,
    StoredEvent,
    check_acknowledged,
    check_announcements,
    check_dag,
    check_reader_rows,
    check_recovery,
    check_samples,
    dag_model,
)
from tests.faults.load import Ledger
from tests.faults.watchers import Heard, Sample

ROOM = "!r:test"


def event(
    eid: str, ordering: int, prevs: tuple[str, ...] = (), instance: str = "w1"
) -> StoredEvent:
    return StoredEvent(eid, ROOM, ordering, False, False, instance, "m.room.message", None,
                       "@u:test", prevs, (), True)  # fmt: skip


def stored(
    events: list[StoredEvent],
    *,
    commit_times: dict[int, float] | None = None,
    edges: set[tuple[str, str]] | None = None,
    forward: set[tuple[str, str]] | None = None,
    backward: set[tuple[str, str]] | None = None,
) -> Stored:
    model = dag_model(events)
    return Stored(
        {e.event_id: e for e in events}, len(events),
        model.edges if edges is None else edges, 0,
        model.forward if forward is None else forward,
        model.backward if backward is None else backward,
        {}, commit_times,
    )  # fmt: skip


def request(seq: int, *events: StoredEvent, backfilled: bool = False) -> BenchRequest:
    gen = tuple(
        GenEvent(e.event_id, ROOM, e.type, None, e.sender, 0, 1, e.prevs, (), b"{}") for e in events
    )
    return BenchRequest(seq, ROOM, "10", backfilled, False, gen, ())


# -- the DAG model --------------------------------------------------------------------


def test_the_model_follows_the_contract_for_a_fork_merged_and_a_missing_prev() -> None:
    a, b, c = event("$a", 1, ("$missing",)), event("$b", 2, ("$a",)), event("$c", 3, ("$a",))
    d = event("$d", 4, ("$b",))
    model = dag_model([a, b, c, d])
    assert model.forward == {(ROOM, "$c"), (ROOM, "$d")}
    assert model.backward == {(ROOM, "$missing")}
    assert ("$d", "$b") in model.edges and len(model.edges) == 4


def test_an_extremity_a_backfilled_event_lists_may_have_left_with_a_later_event() -> None:
    # Backfill changes nothing itself; the room's next forward event drops it.
    create, history = event("$create", 1), event("$old", -1, ("$create",))
    model = dag_model([create, history])
    assert model.forward == set() and model.forward_maybe == {(ROOM, "$create")}
    assert check_dag(stored([create, history], forward={(ROOM, "$create")})) == []
    assert check_dag(stored([create, history], forward=set())) == []


def test_dag_tables_that_differ_from_the_model_are_reported() -> None:
    a, b = event("$a", 1), event("$b", 2, ("$a",))
    assert check_dag(stored([a, b])) == []
    problems = check_dag(stored([a, b], forward={(ROOM, "$a"), (ROOM, "$b")}))
    assert problems and "event_forward_extremities" in problems[0]


# -- acknowledged events --------------------------------------------------------------


def ledger_with(*acks: tuple[str, int, bool]) -> Ledger:
    ledger = Ledger()
    for eid, ordering, duplicate in acks:
        ledger.results.setdefault(eid, []).append(EventResult(eid, ordering, 1, duplicate))
        ledger.sent_events.add(eid)
    return ledger


def test_an_acknowledged_event_that_is_not_stored_is_lost() -> None:
    a = event("$a", 1)
    tally = check_acknowledged(ledger_with(("$a", 1, False), ("$b", 2, False)), stored([a]), [])
    assert tally.lost == 1 and tally.duplicated == 0


def test_two_new_answers_for_one_event_count_as_a_duplicate() -> None:
    a = event("$a", 1)
    tally = check_acknowledged(ledger_with(("$a", 1, False), ("$a", 1, False)), stored([a]), [])
    assert tally.duplicated == 1
    # a retry answered `duplicate: true` with the original ordering is fine
    assert (
        check_acknowledged(ledger_with(("$a", 1, False), ("$a", 1, True)), stored([a]), []).problems
        == []
    )


def test_an_answer_naming_another_ordering_than_stored_is_reported() -> None:
    a = event("$a", 1)
    problems = check_acknowledged(ledger_with(("$a", 7, False)), stored([a]), []).problems
    assert any("another ordering" in p for p in problems)


def test_a_request_stored_in_part_is_half_written() -> None:
    a, b = event("$a", 1), event("$b", 2, ("$a",))
    ledger = ledger_with(("$a", 1, False))
    ledger.sent_events.add("$b")
    problems = check_acknowledged(ledger, stored([a]), [request(0, a, b)]).problems
    assert any("half-written" in p for p in problems)


# -- the stream promise ----------------------------------------------------------------


def test_an_announcement_heard_before_a_commit_it_covers_is_a_violation() -> None:
    a, b = event("$a", 1), event("$b", 2)
    s = stored([a, b], commit_times={1: 10.0, 2: 12.0})
    rows = tuple(e.row() for e in (a, b))
    on_time = [Heard(12.5, rdata_command("w1", 0, 2, rows))]
    early = [Heard(11.0, rdata_command("w1", 0, 2, rows))]
    assert check_announcements(on_time, s).violations == 0
    assert check_announcements(early, s).violations == 1


def test_a_message_must_carry_all_of_its_writers_rows_in_its_range() -> None:
    a, b = event("$a", 1), event("$b", 2)
    s = stored([a, b])
    assert (
        check_announcements([Heard(0, rdata_command("w1", 0, 2, (a.row(), b.row())))], s).violations
        == 0
    )
    assert check_announcements([Heard(0, rdata_command("w1", 0, 2, (b.row(),)))], s).violations == 1
    assert check_announcements([Heard(0, position_command("w1", 1, 2))], s).violations == 1
    # prev == pos claims nothing about earlier rows
    assert check_announcements([Heard(0, position_command("w1", 2, 2))], s).violations == 0


def test_a_stream_that_grew_below_a_sampled_complete_position_is_reported() -> None:
    s = stored([event("$a", 1), event("$b", 2)])
    assert check_samples([Sample(0, 2, 2)], s) == []
    assert len(check_samples([Sample(0, 2, 1)], s)) == 1


def test_the_reader_must_deliver_every_row_once_in_order() -> None:
    a, b, c = event("$a", 1), event("$b", 2), event("$c", 3)
    s = stored([a, b, c])
    rows = [a.row(), b.row(), c.row()]
    assert check_reader_rows(rows, s, 3) == []
    assert check_reader_rows([a.row(), c.row()], s, 3)  # missed one
    assert check_reader_rows([a.row(), a.row(), b.row(), c.row()], s, 3)  # twice
    assert check_reader_rows([b.row(), a.row(), c.row()], s, 3)  # out of order
    assert check_reader_rows([a.row(), b.row()], s, 2) == []  # only up to where it got
    other = EventRow(2, "$b", ROOM, "m.room.topic", "", "@u:test")
    assert check_reader_rows([a.row(), other, c.row()], s, 3)  # not what was stored


# -- positions after restarts ------------------------------------------------------------


def published(pid: int, pos: int, t: float) -> Published:
    return Published(pid, "w1", "w1", pos, pos, 0, t)


def test_a_restart_must_begin_at_or_above_what_was_announced_before() -> None:
    heard = [Heard(1.0, position_command("w1", 0, 50))]
    starts = {"w1": [(100, 0.0), (200, 2.0)]}
    assert check_recovery([published(200, 50, 2.5)], heard, starts) == []
    assert check_recovery([published(200, 40, 2.5)], heard, starts)


def test_one_process_never_announces_a_lower_position_later() -> None:
    assert check_recovery([published(1, 5, 0), published(1, 9, 1)], [], {}) == []
    assert check_recovery([published(1, 9, 0), published(1, 5, 1)], [], {})
