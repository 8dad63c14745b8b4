"""WriterPositions(on_advance=...): every rise of a writer's position is reported
at once, whichever call caused it, so the writer can announce it at once."""

from __future__ import annotations

from persister.positions import WriterPositions
from persister.replication.messages import RData
from persister.replication.publisher import Outbox
from tests.integration.stream_writers import event_row


def recording(start: int = 0) -> tuple[WriterPositions, list[int]]:
    rises: list[int] = []
    return WriterPositions("w1", start, on_advance=rises.append), rises


def test_each_rise_is_reported_once_with_the_new_position() -> None:
    positions, rises = recording(5)
    positions.observe(9)
    positions.observe(9)  # no rise
    positions.observe(3)  # older news
    token = positions.begin_fetch()
    positions.end_fetch(token, [10, 11])  # open orderings hold it at 9
    positions.finish([10, 11])
    assert rises == [9, 11]


def test_a_peer_position_seen_during_a_fetch_is_reported_when_the_fetch_ends() -> None:
    positions, rises = recording()
    token = positions.begin_fetch()
    positions.observe(20)  # a peer announced 20 while our nextval ran
    assert rises == []  # capped: our fetch may still get values <= 20
    positions.end_fetch(token, [21])  # it did not: 20 is ours now, long before 21 commits
    assert rises == [20]


def test_an_abandoned_fetch_and_a_rollback_report_their_rises() -> None:
    positions, rises = recording()
    token = positions.begin_fetch()
    positions.observe(7)
    positions.abandon_fetch(token)
    token = positions.begin_fetch()
    positions.end_fetch(token, [8, 9])
    positions.finish([8, 9])  # rolled back: a hole nobody fills
    assert rises == [7, 9]


def test_a_rise_reported_inside_finish_still_carries_that_batchs_rows() -> None:
    # The writer announces from inside finish(), before the lane hands over
    # the batch's rows; the message is built later, with the rows in it.
    outbox = Outbox("w1")
    outbox.request(0, force=False)
    outbox.mark_sent(outbox.next_command())
    positions = WriterPositions("w1", 0, on_advance=lambda p: outbox.request(p, force=False))
    token = positions.begin_fetch()
    positions.end_fetch(token, [1, 2])
    positions.finish([1, 2])
    outbox.add_rows([event_row(1, "w1"), event_row(2, "w1")])
    command = outbox.next_command()
    assert isinstance(command, RData)
    assert (command.prev, command.pos) == (0, 2)
    assert [row.stream_ordering for row in command.rows] == [1, 2]


def test_each_fetch_reports_the_highest_ordering_it_drew() -> None:
    drawn: list[int] = []
    positions = WriterPositions("w1", 0, on_drawn=drawn.append)
    token = positions.begin_fetch()
    positions.end_fetch(token, [4, 5, 6])
    empty = positions.begin_fetch()
    positions.end_fetch(empty, [])  # a batch of backfill or duplicates only
    assert drawn == [6]
