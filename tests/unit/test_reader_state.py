"""The reader's bookkeeping (StreamState) and tokens, without Redis or PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from persister.positions import WriterPositions
from persister.replication.messages import (
    Command,
    EventRow,
    Position,
    RData,
    position_command,
    rdata_command,
)
from persister.replication.publisher import Outbox
from persister.replication.reader import StreamState, format_token, parse_token


def row(ordering: int, instance: str = "w1") -> EventRow:
    return EventRow(ordering, f"$e{ordering}", "!r:x", "m.room.message", None, f"@{instance}:x")


def rdata(instance: str, prev: int | None, pos: int, *orderings: int) -> RData:
    rows = tuple(row(o, instance) for o in orderings)
    return RData(stream="events", instance=instance, prev=prev, pos=pos, rows=rows)


def drain_buffer(state: StreamState) -> list[int]:
    out = []
    while (next_row := state.next_buffered_row()) is not None:
        out.append(next_row.stream_ordering)
    return out


# -- examples -------------------------------------------------------------------


def test_complete_up_to_is_the_minimum_over_writers() -> None:
    state = StreamState(["w1", "w2"], 0)
    state.apply(position_command("w1", 0, 10))
    assert state.complete_up_to() == 0
    state.apply(position_command("w2", 0, 7))
    assert state.complete_up_to() == 7
    assert state.positions() == {"w1": 10, "w2": 7}


def test_a_continuing_chain_delivers_rows_from_the_buffer_in_stream_order() -> None:
    state = StreamState(["w1", "w2"], 0)
    state.apply(rdata("w1", 0, 4, 1, 4))
    state.apply(rdata("w2", 0, 3, 2, 3))
    assert state.db_range() is None
    assert drain_buffer(state) == [1, 2, 3]
    assert state.delivered() == 3


def test_a_message_whose_prev_is_ahead_sends_the_reader_to_the_database() -> None:
    state = StreamState(["w1"], 0)
    state.apply(rdata("w1", 0, 5, 2))
    state.apply(rdata("w1", 8, 10, 9))  # (5, 8] was in a message we missed
    assert state.db_range() == (0, 8)
    state.mark_delivered(8)
    assert drain_buffer(state) == [9]


def test_old_and_repeated_messages_change_nothing() -> None:
    state = StreamState(["w1"], 0)
    state.apply(rdata("w1", 0, 5, 3))
    assert not state.apply(rdata("w1", 0, 5, 3))
    assert not state.apply(rdata("w1", 0, 2, 1))
    assert drain_buffer(state) == [3]


def test_an_overlapping_message_adds_only_rows_the_reader_does_not_have() -> None:
    # prev < cur <= pos: a relay or a resent message after a reconnect.
    state = StreamState(["w1"], 0)
    state.apply(rdata("w1", 0, 5, 3))
    state.apply(rdata("w1", 2, 9, 3, 7))
    assert state.db_range() is None
    assert drain_buffer(state) == [3, 7]


def test_messages_of_other_streams_are_ignored() -> None:
    state = StreamState(["w1"], 0)
    assert not state.apply(Position(stream="typing", instance="w1", prev=0, pos=5))
    assert state.complete_up_to() == 0


def test_rdata_without_prev_is_trusted_for_its_position_only() -> None:
    state = StreamState(["w1"], 0)
    state.apply(rdata("w1", None, 5, 4))
    assert state.db_range() == (0, 5)


def test_a_stored_position_advances_the_writer_but_vouches_for_no_rows() -> None:
    state = StreamState(["w1"], 0)
    state.apply(rdata("w1", 0, 3, 2))
    state.apply_stored_position("w1", 6)
    assert state.complete_up_to() == 6
    assert state.db_range() == (0, 6)


def test_an_added_writer_never_moves_the_minimum_back() -> None:
    state = StreamState(["w1"], 0)
    state.apply(position_command("w1", 0, 20))
    state.set_writers(["w1", "w2"])
    assert state.complete_up_to() == 20
    assert state.positions() == {"w1": 20, "w2": 20}
    assert state.db_range() == (0, 20)  # w2's rows so far come from the database


def test_an_added_writer_already_heard_from_keeps_its_higher_position() -> None:
    state = StreamState(["w1"], 0)
    state.apply(position_command("w1", 0, 20))
    state.apply(position_command("w2", 25, 25))
    state.set_writers(["w1", "w2"])
    assert state.positions() == {"w1": 20, "w2": 25}


def test_a_removed_writer_no_longer_holds_the_minimum_back() -> None:
    state = StreamState(["w1", "w2"], 0)
    state.apply(position_command("w1", 0, 20))
    state.set_writers(["w1"])
    assert state.complete_up_to() == 20


def test_removing_every_writer_keeps_the_minimum() -> None:
    state = StreamState(["w1"], 0)
    state.apply(position_command("w1", 0, 20))
    state.set_writers([])
    assert state.complete_up_to() == 20


def test_rows_are_only_delivered_up_to_complete_up_to() -> None:
    state = StreamState(["w1", "w2"], 0)
    state.apply(rdata("w1", 0, 9, 5, 9))
    state.apply(position_command("w2", 0, 6))
    assert drain_buffer(state) == [5]
    assert state.delivered() == 6


def test_a_full_buffer_drops_its_oldest_rows_to_the_database() -> None:
    state = StreamState(["w1"], 0, max_buffered_rows=2)
    state.apply(rdata("w1", 0, 4, 1, 2, 3, 4))
    assert state.buffered() == 2
    assert state.db_range() == (0, 2)
    state.mark_delivered(2)
    assert drain_buffer(state) == [3, 4]


def test_rows_at_or_below_delivered_are_never_buffered_again() -> None:
    state = StreamState(["w1"], 0)
    state.apply(rdata("w1", 0, 3, 2))
    assert drain_buffer(state) == [2]
    state.apply(rdata("w1", 1, 5, 2, 5))
    assert drain_buffer(state) == [5]


def test_rows_committed_above_an_open_batch_reach_the_reader_after_heartbeats() -> None:
    positions, outbox, state = WriterPositions("w1", 0), Outbox("w1"), StreamState(["w1"], 0)

    def publish() -> None:
        while outbox.has_work():
            command = outbox.next_command()
            outbox.mark_sent(command)
            state.apply(command)

    outbox.request(0, force=True)  # the writer announces its start before writing
    publish()
    older, newer = positions.begin_fetch(), positions.begin_fetch()
    positions.end_fetch(older, [1])
    positions.end_fetch(newer, [2])
    positions.finish([2])  # the newer batch commits first
    outbox.add_rows([row(2)])
    outbox.request(positions.position(), force=True)  # and a heartbeat goes out
    publish()
    positions.finish([1])
    outbox.add_rows([row(1)])
    outbox.request(positions.position(), force=False)
    publish()
    assert drain_buffer(state) == [1, 2]


@pytest.mark.parametrize(
    ("minimum", "ahead", "token"),
    [(56, {}, "s56"), (56, {3: 59, 2: 58}, "m56~2.58~3.59")],
)
def test_tokens_use_synapse_forms(minimum: int, ahead: dict[int, int], token: str) -> None:
    assert format_token(minimum, ahead) == token
    assert parse_token(token) == (minimum, ahead)


@pytest.mark.parametrize("bad", ["", "m56", "x1", "m5~2", "s-1", "m5~2.3~"])
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a stream token"):
        parse_token(bad)


# -- the whole protocol, simulated ---------------------------------------------------


@dataclass
class _Writer:
    name: str
    positions: WriterPositions
    outbox: Outbox
    open: list[list[int]] = field(default_factory=list)
    alive: bool = True


class Protocol(RuleBasedStateMachine):
    """Writers (WriterPositions + Outbox) and a reader (StreamState) over a lossy channel.

    The database is a dict of committed rows; the channel is one FIFO, like a
    Redis channel, from which messages can be lost or delivered again.
    """

    @initialize(count=st.integers(1, 3), limit=st.integers(1, 4))
    def start(self, count: int, limit: int) -> None:
        self.counter = 0
        self.database: dict[int, EventRow] = {}
        self.stored: dict[str, int] = {}
        self.channel: list[Command] = []
        self.seen: list[Command] = []
        self.page = limit  # rows per database read, small to exercise paging
        self.writers = [self._new_writer(f"w{i}", 0) for i in range(count)]
        self.state = StreamState([w.name for w in self.writers], 0, max_buffered_rows=5)
        self.delivered: list[int] = []
        self.last_complete = 0

    def _new_writer(self, name: str, start: int) -> _Writer:
        writer = _Writer(name, WriterPositions(name, start), Outbox(name))
        writer.outbox.request(start, force=True)  # announced first, before writes
        self.stored[name] = max(self.stored.get(name, 0), start)
        return writer

    def _alive(self) -> list[_Writer]:
        return [w for w in self.writers if w.alive]

    @precondition(lambda self: self._alive())
    @rule(data=st.data(), n=st.integers(1, 3))
    def draw_orderings(self, data: st.DataObject, n: int) -> None:
        writer = data.draw(st.sampled_from(self._alive()))
        token = writer.positions.begin_fetch()
        orderings = list(range(self.counter + 1, self.counter + n + 1))
        self.counter += n
        writer.positions.end_fetch(token, orderings)
        writer.open.append(orderings)

    @precondition(lambda self: any(w.open for w in self._alive()))
    @rule(data=st.data(), commit=st.booleans())
    def transaction_ends(self, data: st.DataObject, commit: bool) -> None:
        writer = data.draw(st.sampled_from([w for w in self._alive() if w.open]))
        batch = data.draw(st.sampled_from(writer.open))
        writer.open.remove(batch)
        rows = [row(o, writer.name) for o in batch] if commit else []
        if commit:
            for committed in rows:
                # The safety property: nothing commits where readers think
                # the stream is already complete.
                assert committed.stream_ordering > self.state.complete_up_to()
                self.database[committed.stream_ordering] = committed
            stored = writer.positions.position_if_finished(batch)
            self.stored[writer.name] = max(self.stored[writer.name], stored)
        writer.positions.finish(batch)
        writer.outbox.add_rows(rows)
        writer.outbox.request(writer.positions.position(), force=False)

    @precondition(lambda self: self._alive())
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from(self._alive()))
        writer.positions.observe(self.counter)
        writer.outbox.request(writer.positions.position(), force=True)

    @precondition(lambda self: any(w.outbox.has_work() for w in self._alive()))
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from([w for w in self._alive() if w.outbox.has_work()]))
        command = writer.outbox.next_command()
        writer.outbox.mark_sent(command)
        self.channel.append(command)

    @precondition(lambda self: self.channel)
    @rule(lose=st.booleans())
    def receive(self, lose: bool) -> None:
        command = self.channel.pop(0)
        if not lose:
            self.seen.append(command)
            self.state.apply(command)

    @precondition(lambda self: self.seen)
    @rule(data=st.data())
    def receive_an_old_message_again(self, data: st.DataObject) -> None:
        self.state.apply(data.draw(st.sampled_from(self.seen)))

    @rule(data=st.data())
    def reconnect_reads_stored_positions(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from(self.writers))
        self.state.apply_stored_position(writer.name, self.stored[writer.name])

    @precondition(lambda self: len(self._alive()) > 1)
    @rule(data=st.data())
    def writer_dies(self, data: st.DataObject) -> None:
        # Its open transactions die with it; unsent messages are gone.
        writer = data.draw(st.sampled_from(self._alive()))
        writer.alive = False
        writer.open.clear()

    @precondition(lambda self: any(not w.alive for w in self.writers))
    @rule(data=st.data())
    def peer_announces_for_the_dead(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from([w for w in self.writers if not w.alive]))
        self._relay_for(writer)

    @precondition(lambda self: any(not w.alive for w in self.writers))
    @rule(data=st.data())
    def dead_writer_restarts(self, data: st.DataObject) -> None:
        dead = data.draw(st.sampled_from([w for w in self.writers if not w.alive]))
        self.writers[self.writers.index(dead)] = self._new_writer(dead.name, self.counter)

    @rule(steps=st.integers(1, 5))
    def consume(self, steps: int) -> None:
        for _ in range(steps):
            span = self.state.db_range()
            if span is None:
                next_row = self.state.next_buffered_row()
                if next_row is not None:
                    self._deliver(next_row)
                continue
            low, high = span
            rows = [r for o, r in sorted(self.database.items()) if low < o <= high]
            page, limited = rows[: self.page], len(rows) > self.page
            for db_row in page:
                self.state.mark_delivered(db_row.stream_ordering)
                self._deliver(db_row)
            self.state.mark_delivered(page[-1].stream_ordering if limited else high)

    def _deliver(self, delivered: EventRow) -> None:
        assert delivered.stream_ordering <= self.state.complete_up_to()
        assert self.database[delivered.stream_ordering] == delivered
        self.delivered.append(delivered.stream_ordering)

    @invariant()
    def each_committed_row_goes_out_once_in_order(self) -> None:
        if not hasattr(self, "state"):
            return
        expected = [o for o in sorted(self.database) if o <= self.state.delivered()]
        assert self.delivered == expected

    @invariant()
    def complete_up_to_never_decreases(self) -> None:
        if not hasattr(self, "state"):
            return
        assert self.state.complete_up_to() >= self.last_complete
        self.last_complete = self.state.complete_up_to()

    @rule()
    def everything_settles(self) -> None:
        """With open transactions ended and every message through, the reader
        reaches the sequence and has delivered every row."""
        for writer in self._alive():
            for batch in list(writer.open):
                writer.open.remove(batch)
                writer.positions.finish(batch)
            writer.positions.observe(self.counter)
            writer.outbox.request(writer.positions.position(), force=True)
            while writer.outbox.has_work():
                command = writer.outbox.next_command()
                writer.outbox.mark_sent(command)
                self.channel.append(command)
        for writer in self.writers:
            if not writer.alive:
                self._relay_for(writer)
        while self.channel:
            self.state.apply(self.channel.pop(0))
        assert self.state.complete_up_to() == self.counter
        while self.state.has_deliverable():
            self.consume(5)
        assert self.delivered == sorted(self.database)

    def _relay_for(self, writer: _Writer) -> None:
        """What persister.liveness publishes: the dead writer's rows in (stored, sequence]."""
        prev, pos = self.stored[writer.name], self.counter
        rows = tuple(
            r
            for o, r in sorted(self.database.items())
            if prev < o <= pos and r.sender == f"@{writer.name}:x"
        )
        self.stored[writer.name] = pos
        self.channel.append(rdata_command(writer.name, prev, pos, rows))


Protocol.TestCase.settings = settings(max_examples=400, stateful_step_count=80, deadline=None)
test_the_protocol_delivers_every_row_once_and_never_ahead_of_a_commit = Protocol.TestCase
