"""How far one writer's share of the events stream is complete.

Every persister takes stream orderings from one shared PostgreSQL sequence, so
a writer's own orderings interleave with everybody else's. A writer's
*position* P is the promise of contract section 6: this writer will never
commit an ordering <= P that is not already committed. Three things bound it:

- **unfinished orderings**: fetched by this writer, transaction not ended.
  The position stays below the lowest one.
- **in-flight fetches**: a `nextval` is running and its values are unknown.
  They will be above whatever the sequence had reached when the fetch began,
  so the position may not pass that.
- **the highest ordering known to be handed out** (`max_seen`): from our own
  fetches, from reading the sequence's last value, or from other writers'
  positions. A fetch that begins later gets values above it.

A finished ordering, committed *or rolled back*, no longer holds anything
back: a rolled-back ordering is a hole nobody will fill, so the position
moves past it at once. (Synapse's linear position waits for every writer to
pass such a hole, which is how an idle writer pins the minimum: #15595.)

    position = max(previous position,
                   min(max_seen, lowest unfinished - 1, lowest in-flight cap))

So an idle writer that keeps observing the sequence follows it, and a busy
writer sits just below its oldest open transaction.

Callers must mark orderings finished only when their transaction has
certainly ended. After a connection error during COMMIT the server may still
be committing; see `persister.liveness.settle_lost_connection`.

Pure bookkeeping, no I/O: the write path drives it. The position can rise
on any call (`observe`, `end_fetch`, `abandon_fetch`, `finish`), so the
writer gives `on_advance`, called with each new position, to announce every
rise at once: a peer's position observed while a fetch was in flight
becomes ours only when the fetch ends, and leaving it to the next commit
held every reader back by a whole transaction (stream lag, issue 3).
`on_drawn`, called with the highest ordering of each fetch, lets the writer
tell its peers early how far the sequence has gone (`persister.replication.peers`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from sortedcontainers import (  # type: ignore[import-untyped, unused-ignore]
    SortedList,
    SortedSet,
)


class _SortedInts(Protocol):
    """The part of SortedSet/SortedList used here (the package ships no types)."""

    def add(self, value: int) -> None: ...
    def remove(self, value: int) -> None: ...
    def discard(self, value: int) -> None: ...
    def update(self, values: Iterable[int]) -> None: ...
    def __getitem__(self, index: int) -> int: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[int]: ...


OnAdvance = Callable[[int], None]


class WriterPositions:
    """The position of one writer (see the module docstring)."""

    def __init__(
        self,
        instance: str,
        start: int,
        on_advance: OnAdvance | None = None,
        on_drawn: OnAdvance | None = None,
    ) -> None:
        """`on_advance(position)` runs inside the call that raised the position;
        it must not block, and may not rely on the caller's rows being handed
        over yet (see `persister.replication.publisher` for why that is fine).
        `on_drawn(ordering)` runs inside `end_fetch` with the fetch's highest
        ordering: the sequence has handed that out (a fact, not a promise)."""
        self.instance = instance
        self._on_advance = on_advance
        self._on_drawn = on_drawn
        self._position = start
        self._max_seen = start
        self._unfinished: _SortedInts = SortedSet()
        # token -> the cap of that fetch; the caps are also kept sorted
        # (duplicates allowed) so the lowest one is at hand.
        self._fetches: dict[int, int] = {}
        self._caps: _SortedInts = SortedList()
        self._tokens = itertools.count(1)

    def begin_fetch(self) -> int:
        """Call before `nextval`; the position cannot pass today's max_seen until it ends."""
        token = next(self._tokens)
        self._fetches[token] = self._max_seen
        self._caps.add(self._max_seen)
        return token

    def fetch_floor(self, token: int) -> int:
        """What the sequence had reached when fetch `token` began: whatever it
        draws is above this."""
        return self._fetches[token]

    def end_fetch(self, token: int, orderings: Sequence[int]) -> None:
        """The fetch returned these orderings; they are unfinished until `finish`."""
        cap = self._close_fetch(token)
        stale = [ordering for ordering in orderings if ordering <= cap]
        if stale:
            # The sequence handed out something we had already been told it
            # passed: a nextval outside begin/end_fetch, or a bad `observe`.
            # Going on would break promises already published.
            raise ValueError(
                f"{self.instance}: orderings {stale} are not above {cap}, "
                "which the sequence had reached when the fetch began"
            )
        self._unfinished.update(orderings)
        self._max_seen = max(self._max_seen, max(orderings, default=cap))
        if orderings and self._on_drawn is not None:
            self._on_drawn(max(orderings))
        self._advance()

    def abandon_fetch(self, token: int) -> None:
        """The `nextval` failed. Values it may have drawn belong to a dead
        transaction, so they can never be committed."""
        self._close_fetch(token)
        self._advance()

    def finish(self, orderings: Sequence[int]) -> None:
        """These orderings' transaction has ended, committed or rolled back."""
        for ordering in orderings:
            self._unfinished.discard(ordering)
        self._advance()

    def observe(self, ordering: int) -> None:
        """The shared sequence is known to have handed out `ordering` already."""
        if ordering > self._max_seen:
            self._max_seen = ordering
            self._advance()

    def position(self) -> int:
        return self._position

    def max_seen(self) -> int:
        """The highest ordering known to be handed out by the shared sequence."""
        return self._max_seen

    def position_if_finished(self, orderings: Sequence[int]) -> int:
        """The position once `orderings` finish, for the stream_positions row
        written inside their own transaction (it commits only if they do)."""
        return max(self._position, self._bound(excluding=frozenset(orderings)))

    def unfinished_count(self) -> int:
        return len(self._unfinished)

    def in_flight_fetches(self) -> int:
        return len(self._fetches)

    def __repr__(self) -> str:
        return (
            f"WriterPositions({self.instance!r}, position={self._position}, "
            f"max_seen={self._max_seen}, unfinished={len(self._unfinished)}, "
            f"fetches={len(self._fetches)})"
        )

    def _close_fetch(self, token: int) -> int:
        try:
            cap = self._fetches.pop(token)
        except KeyError:
            raise ValueError(f"{self.instance}: unknown or already closed fetch {token}") from None
        self._caps.remove(cap)
        return cap

    def _bound(self, excluding: frozenset[int] = frozenset()) -> int:
        bound = self._max_seen
        if len(self._caps):
            bound = min(bound, self._caps[0])
        lowest = next((o for o in self._unfinished if o not in excluding), None)
        if lowest is not None:
            bound = min(bound, lowest - 1)
        return bound

    def _advance(self) -> None:
        bound = self._bound()
        if bound > self._position:
            self._position = bound
            if self._on_advance is not None:
                self._on_advance(bound)
