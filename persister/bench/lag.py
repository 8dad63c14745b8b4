"""Stream lag: from a persist answer to a reader seeing the stream complete.

For each answered request with new forward events, the highest stream
ordering it got is noted with the answer's time. A `StreamReader` follows
the writers' POSITION messages; when its `complete_up_to()` reaches a noted
ordering, the lag sample is "reader sees it" minus "client got the answer"
(0 if the reader saw it first). That is the delay a Matrix reader (a sync
worker) adds on top of the persist latency before it can show the event.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import Protocol

from persister.wire import PersistResponse

# A sample still unseen after this long is counted as this long: a writer
# that stopped announcing must not hang the harness.
MAX_LAG_S = 10.0

OnLag = Callable[[float, float], None]


class PositionReader(Protocol):
    def complete_up_to(self) -> int: ...

    async def wait_for(self, position: int, timeout: float) -> bool: ...


class LagTracker:
    def __init__(self, reader: PositionReader) -> None:
        self._reader = reader
        self._pending: list[tuple[int, float, OnLag]] = []
        self._wakeup = asyncio.Event()
        self.unseen = 0

    def note(self, answered: float, response: PersistResponse, on_lag: OnLag) -> None:
        highest = max((r.stream_ordering for r in response.results if not r.duplicate), default=0)
        if highest <= 0:
            return  # duplicates and backfill do not move the forward stream
        if self._reader.complete_up_to() >= highest:
            on_lag(answered, answered)
            return
        heapq.heappush(self._pending, (highest, answered, on_lag))
        self._wakeup.set()

    async def run(self) -> None:
        """Resolve noted samples as the reader advances; runs until cancelled."""
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            target, answered, _ = self._pending[0]
            budget = answered + MAX_LAG_S - time.perf_counter()
            if budget > 0:
                await self._reader.wait_for(target, min(budget, 1.0))
            self._resolve(time.perf_counter())

    def _resolve(self, now: float) -> None:
        complete = self._reader.complete_up_to()
        while self._pending:
            target, answered, on_lag = self._pending[0]
            timed_out = now - answered >= MAX_LAG_S
            if target > complete and not timed_out:
                return
            heapq.heappop(self._pending)
            self.unseen += timed_out and target > complete
            on_lag(answered, now)

    async def flush(self, timeout: float) -> None:
        """Give the last samples up to `timeout` to resolve."""
        deadline = time.perf_counter() + timeout
        while self._pending and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
