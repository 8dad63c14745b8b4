"""The queue budget: exact refusal when a request is reserved, and an early
refusal, before the body is read, of a request that would most likely not
fit (persister.writer.queue.Budget)."""

from __future__ import annotations

import pytest

from persister.errors import Saturated
from persister.writer.queue import Budget


def budget(max_events: int = 100, max_bytes: int = 100_000) -> Budget:
    return Budget(max_events, max_bytes, retry_after_s=0.5)


def test_a_request_that_does_not_fit_is_refused_with_its_retry_after() -> None:
    b = budget()
    b.reserve(90, 9_000)
    with pytest.raises(Saturated) as refused:
        b.reserve(20, 2_000)
    assert refused.value.retry_after_s == 0.5
    assert (b.events, b.bytes) == (90, 9_000)


def test_the_early_check_guesses_events_from_the_size_of_those_seen() -> None:
    b = budget()
    b.reserve(90, 9_000)  # 100 bytes per event
    b.check_room(900)  # ~9 events: fits beside 90
    with pytest.raises(Saturated):
        b.check_room(2_000)  # ~20 events: would not


def test_the_early_check_counts_bytes_exactly() -> None:
    b = budget(max_events=10_000, max_bytes=10_000)
    b.reserve(1, 9_000)
    with pytest.raises(Saturated):
        b.check_room(1_001)


def test_with_empty_queues_nothing_is_refused_early() -> None:
    # Whatever the guess says, a request that fits alone is decoded and
    # reserved exactly; an unknown size (a chunked body) is never refused early.
    b = budget(max_events=10)
    b.reserve(1, 10)
    b.release(1, 10)
    b.check_room(1_000_000)
    b.reserve(5, 10)
    b.check_room(None)
