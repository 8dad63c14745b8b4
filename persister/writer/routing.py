"""Which lane writes a room's next request. No I/O.

A room's requests go to the lane that holds one of them already (queued,
parked or being written, until that lane is done with it, a lost COMMIT
settled included). So a room's events are written in the order they came,
one transaction at a time, and the writer's memory of the room
(`persister.writer.memory`) is never read while a write of it is open.

A room with nothing held goes where its caller says: the requests of one
HTTP exchange go together (`Together`), a transaction's worth of events to
the lane with the least to do (`Writer.choose_lane`), the next to the lane
with the least to do then. With rooms hashed to lanes, every exchange was
split over all the lanes, none of which could start before the whole
exchange was validated, and its answer waited for the slowest of them: 64
single events in flight went as one exchange written as two transactions
of 32 side by side, with the machine 62 % busy. Now the client sends them
as two exchanges of 32 (`persister.batching`), each written by one lane,
the machine is 69-70 % busy and, at equal CPU per event, about a tenth
more events are written (bench/README.md, fourteenth session).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class RoomLanes:
    """The lane of every room that has requests held by a lane."""

    def __init__(self) -> None:
        # room -> [lane index, requests of the room that lane holds]
        self._held: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def lane_of(self, room_id: str) -> int | None:
        """The lane that must take the room's next request, if one must."""
        held = self._held.get(room_id)
        return None if held is None else held[0]

    def hold(self, room_id: str, lane: int) -> None:
        """A request of the room was queued in `lane`, which must be the
        room's lane if it has one."""
        held = self._held.get(room_id)
        if held is None:
            self._held[room_id] = [lane, 1]
            return
        if held[0] != lane:
            raise ValueError(f"room {room_id} is held by lane {held[0]}, not {lane}")
        held[1] += 1

    def release(self, room_id: str) -> None:
        """Its lane is done with one of the room's requests."""
        held = self._held[room_id]
        held[1] -= 1
        if held[1] == 0:
            del self._held[room_id]


@dataclass(slots=True)
class Together:
    """The lanes of the rooms of one exchange that no lane holds: the same
    lane until it has been given a transaction's worth of events, then the
    one `choose` says (the least busy, which is another while the first has
    them queued).

    Bigger pieces would be written one after the other by one lane while
    the other had nothing, and their orderings would hold back the stream
    position for longer."""

    choose: Callable[[], int]
    max_events: int
    lane: int | None = None
    events: int = 0

    def lane_for(self, events: int) -> int:
        """The lane for a request of `events` events."""
        if self.lane is None or (self.events and self.events + events > self.max_events):
            self.lane = self.choose()
            self.events = 0
        self.events += events
        return self.lane
