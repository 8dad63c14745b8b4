"""WriterPositions: the promise "never commit an ordering <= position later"."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from persister.positions import WriterPositions

# -- named examples -----------------------------------------------------------


def test_a_new_writer_starts_at_its_recovered_position() -> None:
    assert WriterPositions("w1", 41).position() == 41


def test_idle_writer_advances_to_the_sequence() -> None:
    positions = WriterPositions("w1", 10)
    positions.observe(250)  # other writers drew up to 250; we have nothing open
    assert positions.position() == 250


def test_rolled_back_orderings_do_not_stall_the_position() -> None:
    positions = WriterPositions("w1", 0)
    token = positions.begin_fetch()
    positions.end_fetch(token, [1, 2, 3])
    positions.finish([1, 2, 3])  # the transaction rolled back: a gap nobody fills
    positions.observe(9)
    assert positions.position() == 9


def test_position_stays_below_the_oldest_open_transaction() -> None:
    positions = WriterPositions("w1", 0)
    old, new = positions.begin_fetch(), positions.begin_fetch()
    positions.end_fetch(old, [1, 2])
    positions.end_fetch(new, [3, 4])
    positions.finish([3, 4])  # the newer batch commits first
    assert positions.position() == 0
    positions.finish([1, 2])
    assert positions.position() == 4


def test_a_running_fetch_caps_the_position_at_what_was_known_when_it_began() -> None:
    positions = WriterPositions("w1", 5)
    token = positions.begin_fetch()
    positions.observe(20)  # the sequence moved on while our nextval runs
    assert positions.position() == 5
    positions.end_fetch(token, [21])
    assert positions.position() == 20
    positions.finish([21])
    assert positions.position() == 21


def test_an_abandoned_fetch_no_longer_caps_the_position() -> None:
    positions = WriterPositions("w1", 5)
    token = positions.begin_fetch()
    positions.observe(20)
    positions.abandon_fetch(token)
    assert positions.position() == 20


def test_position_if_finished_predicts_the_position_after_the_commit() -> None:
    positions = WriterPositions("w1", 0)
    first, second = positions.begin_fetch(), positions.begin_fetch()
    positions.end_fetch(first, [1])
    positions.end_fetch(second, [2, 3])
    assert positions.position_if_finished([2, 3]) == 0  # 1 is still open
    assert positions.position_if_finished([1]) == 1
    positions.finish([1])
    assert positions.position() == 1


def test_position_never_decreases_when_observing_older_values() -> None:
    positions = WriterPositions("w1", 30)
    positions.observe(12)
    assert positions.position() == 30


def test_orderings_the_sequence_had_already_passed_are_refused() -> None:
    positions = WriterPositions("w1", 0)
    positions.observe(10)
    token = positions.begin_fetch()
    with pytest.raises(ValueError, match="not above 10"):
        positions.end_fetch(token, [7])


def test_closing_a_fetch_twice_is_refused() -> None:
    positions = WriterPositions("w1", 0)
    token = positions.begin_fetch()
    positions.abandon_fetch(token)
    with pytest.raises(ValueError, match="unknown or already closed"):
        positions.end_fetch(token, [1])


def test_finishing_unknown_orderings_is_harmless() -> None:
    positions = WriterPositions("w1", 3)
    positions.finish([99])
    assert positions.position() == 3


# -- random interleavings -------------------------------------------------------


@dataclass
class _Fetch:
    token: int
    drawn: list[int] | None = None  # None until the nextval ran


@dataclass
class _Writer:
    positions: WriterPositions
    fetches: list[_Fetch] = field(default_factory=list)
    # Drawn by a fetch that ended and not finished yet.
    open: set[int] = field(default_factory=set)
    last_position: int = 0

    def unfinished(self) -> set[int]:
        """What the writer might still commit: open, or drawn by a running fetch."""
        drawing = {o for fetch in self.fetches for o in (fetch.drawn or [])}
        return self.open | drawing


class SharedSequence(RuleBasedStateMachine):
    """Several writers over one counter, every step order allowed."""

    writers: list[_Writer]
    counter: int

    @initialize(start=st.integers(0, 5), count=st.integers(1, 3))
    def start(self, start: int, count: int) -> None:
        self.counter = start
        self.writers = [
            _Writer(WriterPositions(f"w{i}", start), last_position=start) for i in range(count)
        ]

    @rule(data=st.data())
    def begin_fetch(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from(self.writers))
        writer.fetches.append(_Fetch(writer.positions.begin_fetch()))

    @precondition(lambda self: any(f.drawn is None for w in self.writers for f in w.fetches))
    @rule(data=st.data(), n=st.integers(1, 4))
    def nextval_runs(self, data: st.DataObject, n: int) -> None:
        fetch = data.draw(
            st.sampled_from([f for w in self.writers for f in w.fetches if f.drawn is None])
        )
        fetch.drawn = list(range(self.counter + 1, self.counter + n + 1))
        self.counter += n

    @precondition(lambda self: any(f.drawn is not None for w in self.writers for f in w.fetches))
    @rule(data=st.data())
    def end_fetch(self, data: st.DataObject) -> None:
        writer, fetch = data.draw(
            st.sampled_from(
                [(w, f) for w in self.writers for f in w.fetches if f.drawn is not None]
            )
        )
        assert fetch.drawn is not None
        writer.fetches.remove(fetch)
        writer.positions.end_fetch(fetch.token, fetch.drawn)
        writer.open.update(fetch.drawn)

    @precondition(lambda self: any(w.fetches for w in self.writers))
    @rule(data=st.data())
    def fetch_fails(self, data: st.DataObject) -> None:
        # Before or after the nextval ran: drawn values die with the transaction.
        writer, fetch = data.draw(
            st.sampled_from([(w, f) for w in self.writers for f in w.fetches])
        )
        writer.fetches.remove(fetch)
        writer.positions.abandon_fetch(fetch.token)

    @precondition(lambda self: any(w.open for w in self.writers))
    @rule(data=st.data())
    def transaction_ends(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from([w for w in self.writers if w.open]))
        batch = data.draw(st.lists(st.sampled_from(sorted(writer.open)), min_size=1, unique=True))
        predicted = writer.positions.position_if_finished(batch)
        writer.positions.finish(batch)  # committed or rolled back alike
        writer.open.difference_update(batch)
        assert writer.positions.position() == predicted

    @rule(data=st.data())
    def observe_the_sequence(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from(self.writers))
        writer.positions.observe(data.draw(st.integers(0, self.counter)))

    @rule(data=st.data())
    def observe_another_writer(self, data: st.DataObject) -> None:
        writer, other = (
            data.draw(st.sampled_from(self.writers)),
            data.draw(st.sampled_from(self.writers)),
        )
        writer.positions.observe(other.positions.position())

    @rule(data=st.data())
    def idle_writer_catches_up(self, data: st.DataObject) -> None:
        writer = data.draw(st.sampled_from(self.writers))
        writer.positions.observe(self.counter)
        if not writer.fetches and not writer.open:
            assert writer.positions.position() == self.counter

    @invariant()
    def position_is_below_every_unfinished_ordering(self) -> None:
        for writer in self.writers:
            unfinished = writer.unfinished()
            if unfinished:
                assert writer.positions.position() < min(unfinished)

    @invariant()
    def position_is_not_beyond_what_the_sequence_handed_out(self) -> None:
        # Anything drawn later is above the counter, so the promise covers it.
        for writer in self.writers:
            assert writer.positions.position() <= self.counter

    @invariant()
    def positions_never_decrease(self) -> None:
        for writer in self.writers:
            assert writer.positions.position() >= writer.last_position
            writer.last_position = writer.positions.position()


SharedSequence.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
test_random_interleavings_keep_the_promise = SharedSequence.TestCase
