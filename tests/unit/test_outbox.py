"""The publisher's outbox (persister.replication.publisher.Outbox): which message goes next."""

from __future__ import annotations

import logging

import pytest

from persister.replication import publisher
from persister.replication.messages import EventRow, Position, RData, position_command
from persister.replication.publisher import Outbox


def row(ordering: int) -> EventRow:
    return EventRow(ordering, f"$e{ordering}", "!r:x", "m.room.message", None, "@u:x")


def send(outbox: Outbox) -> Position | RData:
    command = outbox.next_command()
    outbox.mark_sent(command)
    return command


def started(at: int) -> Outbox:
    outbox = Outbox("w1")
    outbox.request(at, force=True)
    send(outbox)
    return outbox


def test_the_first_message_makes_no_claim_about_earlier_rows() -> None:
    outbox = Outbox("w1")
    outbox.add_rows([row(7)])
    outbox.request(9, force=False)
    # prev == pos: readers that are behind read the database instead.
    assert send(outbox) == position_command("w1", 9, 9)


def test_the_first_message_starts_the_chain_at_the_first_position_asked_for() -> None:
    outbox = Outbox("w1")
    outbox.request(0, force=True)  # the writer's start, announced before writing
    outbox.add_rows([row(1), row(2)])  # written before anything went out
    outbox.request(2, force=False)
    assert send(outbox) == position_command("w1", 0, 0)
    command = send(outbox)
    assert isinstance(command, RData)
    assert (command.prev, command.pos, len(command.rows)) == (0, 2, 2)


def test_rdata_carries_exactly_the_rows_between_prev_and_pos() -> None:
    outbox = started(10)
    outbox.add_rows([row(11), row(13)])
    outbox.request(13, force=False)
    command = send(outbox)
    assert isinstance(command, RData)
    assert (command.prev, command.pos) == (10, 13)
    assert [r.stream_ordering for r in command.rows] == [11, 13]


def test_rows_above_the_position_wait_until_the_position_passes_them() -> None:
    outbox = started(10)
    outbox.add_rows([row(14)])  # committed while 11..13 are still open
    outbox.request(10, force=False)
    assert not outbox.has_work()
    outbox.add_rows([row(12)])
    outbox.request(14, force=False)
    command = send(outbox)
    assert isinstance(command, RData)
    assert [r.stream_ordering for r in command.rows] == [12, 14]


def test_a_heartbeat_while_an_older_batch_is_open_keeps_newer_rows_back() -> None:
    outbox = started(10)
    outbox.add_rows([row(12)])  # 11 is still open
    outbox.request(10, force=True)
    assert send(outbox) == position_command("w1", 10, 10)
    assert outbox.pending_rows() == 1  # 12 goes out once the position passes it


def test_a_position_without_rows_goes_out_as_position() -> None:
    outbox = started(10)
    outbox.request(15, force=False)
    assert send(outbox) == position_command("w1", 10, 15)


def test_a_heartbeat_repeats_an_unchanged_position() -> None:
    outbox = started(10)
    assert not outbox.has_work()
    outbox.request(10, force=True)
    assert send(outbox) == position_command("w1", 10, 10)
    assert not outbox.has_work()


def test_a_lower_position_asked_later_is_covered_by_the_newer_one() -> None:
    outbox = started(10)
    outbox.request(20, force=False)
    outbox.request(15, force=False)
    assert send(outbox) == position_command("w1", 10, 20)


def test_nothing_is_lost_when_sending_fails_and_is_retried() -> None:
    outbox = started(10)
    outbox.add_rows([row(11)])
    outbox.request(11, force=False)
    outbox.next_command()  # Redis refused it: not marked sent
    outbox.add_rows([row(12)])
    outbox.request(12, force=False)
    command = send(outbox)
    assert isinstance(command, RData)
    assert (command.prev, [r.stream_ordering for r in command.rows]) == (10, [11, 12])


def test_big_batches_are_split_into_messages_that_each_keep_the_promise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publisher, "MAX_ROWS_PER_MESSAGE", 2)
    outbox = started(0)
    outbox.add_rows([row(o) for o in range(1, 6)])
    outbox.request(6, force=False)
    chain = []
    while outbox.has_work():
        command = send(outbox)
        rows = [r.stream_ordering for r in command.rows] if isinstance(command, RData) else []
        chain.append((command.prev, command.pos, rows))
    assert chain == [(0, 2, [1, 2]), (2, 4, [3, 4]), (4, 6, [5])]


def test_rows_dropped_while_redis_is_down_send_readers_to_the_database() -> None:
    outbox = Outbox("w1", max_pending_rows=3)
    outbox.request(0, force=True)
    send(outbox)
    outbox.add_rows([row(1), row(2)])
    outbox.request(2, force=False)  # Redis is down: nothing sent
    outbox.add_rows([row(3), row(4)])  # over the limit: all four dropped
    outbox.request(5, force=False)
    assert send(outbox) == position_command("w1", 5, 5)
    outbox.add_rows([row(6)])
    outbox.request(6, force=False)
    command = send(outbox)
    assert isinstance(command, RData)
    assert (command.prev, command.pos) == (5, 6)  # the chain resumes


def test_a_row_handed_over_after_a_covering_position_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = started(10)
    with caplog.at_level(logging.ERROR):
        outbox.add_rows([row(9)])
    assert "arrived after position 10" in caplog.text
    assert outbox.pending_rows() == 0


def test_relays_go_out_first_and_leave_our_own_chain_alone() -> None:
    outbox = started(10)
    outbox.request(12, force=False)
    relay = position_command("dead", 3, 40)
    outbox.relay(relay)
    assert send(outbox) == relay
    assert outbox.announced == 10
    assert send(outbox) == position_command("w1", 10, 12)
