"""What a lane remembers of the rooms it writes, to plan a batch without loading. No I/O.

A room belongs to one writer at a time (the shard map) and, within it, to
one lane (the lanes' hash), and that lane commits every event the room gets
while it is theirs. So once a batch has committed, the lane knows the room's
version, its forward extremities and its newest events exactly as stored,
for as long as the shard map stays the same. A batch of new, accepted events
of such rooms, whose prevs are among those events, is planned from this
memory (`plan`) and written in one round trip instead of two
(`persister.writer.lane`).

The write does not take the memory on trust: it refuses the batch if the
forward extremities it replaces are not the ones remembered, if a stored
event lists one of the new events as a missing prev, or (the unique index)
if one of them is stored already (`persister.storage.events_txn`,
`WRITE_REMEMBERED`). The lane then forgets everything and loads, as it does
after any transaction whose end it cannot be sure of, and whenever the
shard map changes (a room may have moved away and back, written meanwhile
by another writer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from persister.dag import PLANNED, BatchPlan, LinkRequest, StoredEvent, StoredView, link_batch

# The prevs of a new event are nearly always its room's newest few events.
EVENTS_PER_ROOM = 32
# Rooms written least recently are forgotten first beyond this many.
ROOMS = 50_000


@dataclass(frozen=True, slots=True)
class RememberedPlan:
    """A batch planned from memory."""

    view: StoredView  # as `dag.link_batch` left it
    plan: BatchPlan
    # The rooms' forward extremities (room, event) as remembered before the
    # batch: the write refuses the batch unless they are exactly the stored ones.
    forward_extremities: list[tuple[str, str]]


@dataclass(slots=True)
class RoomMemory:
    version: str
    forward_extremities: set[str]
    # Stored events of the room, accepted and not outliers, newest last.
    recent: dict[str, StoredEvent] = field(default_factory=dict)


class RoomsMemory:
    """One lane's memory of its rooms, valid under one shard-map epoch."""

    def __init__(self, rooms: int = ROOMS, events_per_room: int = EVENTS_PER_ROOM) -> None:
        self._max_rooms = rooms
        self._events_per_room = events_per_room
        self._rooms: dict[str, RoomMemory] = {}
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self._rooms)

    def forget(self) -> None:
        self._rooms.clear()

    def plan(self, links: Sequence[LinkRequest], epoch: int) -> RememberedPlan | None:
        """The plan of a batch that memory alone can plan, or None: then it
        must be loaded. Routed by `epoch`."""
        self._follow(epoch)
        view = self._view(links)
        if view is None:
            return None
        forward = [(room, e) for room, events in view.forward_extremities.items() for e in events]
        plan = link_batch(view, links)
        if (
            not plan.new_events
            or plan.new_rooms
            or plan.deoutliered
            or plan.rejections
            or plan.backward_added
            or plan.backward_removed
        ):
            return None
        return RememberedPlan(view, plan, forward)

    def remember(
        self,
        links: Sequence[LinkRequest],
        view: StoredView,
        orderings: dict[str, int],
        epoch: int,
    ) -> None:
        """A batch committed under `epoch`: `view` is how `dag.link_batch`
        left it (so it holds the rooms as they now are) and `orderings` the
        ones its new events took."""
        self._follow(epoch)
        rooms = {link.room_id for link in links}
        for room_id in rooms:
            version = view.room_versions.get(room_id)
            previous = self._rooms.pop(room_id, None)  # re-inserted as the newest
            forward = view.forward_extremities.get(room_id, set())
            if version is None or not forward.isdisjoint(view.referenced):
                # A backfilled event listed a forward extremity, which the next
                # event drops: only loading knows that (`dag`), so load the room.
                continue
            self._rooms[room_id] = RoomMemory(
                version, set(forward), previous.recent if previous is not None else {}
            )
        for event_id, stored in view.events.items():
            room = self._rooms.get(stored.room_id) if stored.room_id in rooms else None
            if room is None or stored.outlier or stored.rejected:
                continue
            ordering = stored.stream_ordering
            if ordering == PLANNED:
                ordering = orderings[event_id]
            room.recent.pop(event_id, None)
            room.recent[event_id] = StoredEvent(
                stored.room_id, False, False, ordering, stored.depth
            )
            if len(room.recent) > self._events_per_room:
                del room.recent[next(iter(room.recent))]
        while len(self._rooms) > self._max_rooms:
            del self._rooms[next(iter(self._rooms))]

    def _follow(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._rooms.clear()
            self._epoch = epoch

    def _view(self, links: Sequence[LinkRequest]) -> StoredView | None:
        """What loading would have found for this batch, if memory knows it all."""
        events: dict[str, StoredEvent] = {}
        versions: dict[str, str] = {}
        forward: dict[str, set[str]] = {}
        in_batch: set[str] = set()
        for link in links:
            room = self._rooms.get(link.room_id)
            if room is None or link.backfilled:
                return None
            versions[link.room_id] = room.version
            forward.setdefault(link.room_id, set(room.forward_extremities))
            for event in link.events:
                if event.outlier or event.rejected_reason is not None:
                    return None
                if event.event_id in room.recent or event.event_id in in_batch:
                    return None  # a duplicate: loading says what it was
                for prev in event.prev_event_ids:
                    stored = room.recent.get(prev)
                    if stored is not None:
                        events[prev] = stored
                    elif prev not in in_batch:
                        return None
                in_batch.add(event.event_id)
        return StoredView(events, versions, forward, set(), set())
