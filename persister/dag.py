"""Linking events into their room's DAG (contract section 4). No I/O.

The storage layer loads a `StoredView` of what the database already knows
about the events and rooms of a batch; `link_batch` walks the batch's
requests in order and returns the `BatchPlan` of rows and extremity changes
that one transaction must write. Later requests of a batch see what earlier
ones planned, exactly as if each had been committed in turn.

Rules, following Synapse where the contract leaves room:
- A new non-outlier, non-rejected event becomes a forward extremity unless a
  stored (or earlier) non-outlier, non-rejected event lists it as a prev; its
  prevs stop being forward extremities, and so does any forward extremity
  that such an event lists (a backfilled one may: Synapse's
  `_calculate_new_extremities`). Backfilled events never change forward
  extremities.
- Non-rejected events get `event_edges` rows (outliers too, as in Synapse);
  only non-outliers turn missing or outlier prevs into backward extremities,
  and an arriving event stops being one (a rejected one too: it is no longer
  missing).
- Rejected events are stored with their reason and otherwise touch no
  extremity.
- An event already stored is a duplicate and changes nothing, except that an
  outlier arriving as an accepted non-outlier is de-outliered in place (it
  keeps its stream ordering, as in Synapse) and then linked like a new event
  of its request, backfilled or not. An outlier stored as rejected stays
  rejected: it is de-outliered but linked into nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from persister.errors import InvalidEvent
from persister.matrix.prepared import PreparedEvent

# No stored event has ordering 0: forward orderings start at 1, backfilled
# ones at -1. It marks an event planned earlier in the same batch.
PLANNED = 0


class StoredEvent(msgspec.Struct, frozen=True, gc=False):
    room_id: str
    outlier: bool
    rejected: bool
    stream_ordering: int
    depth: int


class StoredView(msgspec.Struct):
    """What the database holds about one batch, loaded before linking."""

    events: dict[str, StoredEvent]
    room_versions: dict[str, str]
    forward_extremities: dict[str, set[str]]
    backward_extremities: set[tuple[str, str]]
    # Events of the batch, and forward extremities of its rooms, that a
    # stored non-outlier, non-rejected event already lists as a prev: they
    # are never forward extremities once a non-backfilled event is linked.
    referenced: set[str]


class LinkRequest(msgspec.Struct, frozen=True):
    room_id: str
    room_version: str
    backfilled: bool
    events: Sequence[PreparedEvent]


class EventOutcome(msgspec.Struct, frozen=True, gc=False):
    event_id: str
    depth: int
    # None: a new event, which takes the next ordering of the batch.
    # PLANNED: an earlier event of the same batch, resolved at write time.
    stored_ordering: int | None
    duplicate: bool


class BatchPlan(msgspec.Struct):
    new_events: list[PreparedEvent]
    new_backfilled: list[bool]
    deoutliered: list[str]
    edges: list[tuple[str, str, str]]
    auth: list[tuple[str, str, str]]
    rejections: list[tuple[str, str]]
    new_rooms: dict[str, str]
    forward_added: set[tuple[str, str]]
    forward_removed: set[tuple[str, str]]
    backward_added: set[tuple[str, str]]
    backward_removed: set[tuple[str, str]]
    outcomes: list[list[EventOutcome] | InvalidEvent]


def empty_plan() -> BatchPlan:
    return BatchPlan(
        new_events=[],
        new_backfilled=[],
        deoutliered=[],
        edges=[],
        auth=[],
        rejections=[],
        new_rooms={},
        forward_added=set(),
        forward_removed=set(),
        backward_added=set(),
        backward_removed=set(),
        outcomes=[],
    )


def link_batch(view: StoredView, requests: Sequence[LinkRequest]) -> BatchPlan:
    """Plan every request in order; a request that breaks a rule fails alone."""
    plan = empty_plan()
    for request in requests:
        problem = _check_request(view, request)
        if problem is not None:
            plan.outcomes.append(problem)
            continue
        plan.outcomes.append(_link_request(view, plan, request))
    return plan


def _check_request(view: StoredView, request: LinkRequest) -> InvalidEvent | None:
    stored_version = view.room_versions.get(request.room_id)
    if stored_version is not None and stored_version != request.room_version:
        return InvalidEvent(
            0,
            "room_version",
            f"room {request.room_id} has room version {stored_version}, not {request.room_version}",
            errcode="M_INCOMPATIBLE_ROOM_VERSION",
        )
    for index, event in enumerate(request.events):
        stored = view.events.get(event.event_id)
        if stored is not None and stored.room_id != request.room_id:
            return InvalidEvent(
                index, "event_id", f"{event.event_id} is already stored in another room"
            )
    return None


def _link_request(view: StoredView, plan: BatchPlan, request: LinkRequest) -> list[EventOutcome]:
    if request.room_id not in view.room_versions:
        view.room_versions[request.room_id] = request.room_version
        plan.new_rooms[request.room_id] = request.room_version
    outcomes = []
    for event in request.events:
        outcomes.append(_link_event(view, plan, event, request.backfilled))
    return outcomes


def _link_event(
    view: StoredView, plan: BatchPlan, event: PreparedEvent, backfilled: bool
) -> EventOutcome:
    stored = view.events.get(event.event_id)
    if stored is not None:
        if stored.outlier and not event.outlier and event.rejected_reason is None:
            _deoutlier(view, plan, event, stored, backfilled)
            return EventOutcome(event.event_id, stored.depth, stored.stream_ordering, False)
        return EventOutcome(event.event_id, stored.depth, stored.stream_ordering, True)
    _store_new(view, plan, event, backfilled)
    return EventOutcome(event.event_id, event.depth, None, False)


def _store_new(view: StoredView, plan: BatchPlan, event: PreparedEvent, backfilled: bool) -> None:
    view.events[event.event_id] = StoredEvent(
        event.room_id, event.outlier, event.rejected_reason is not None, PLANNED, event.depth
    )
    plan.new_events.append(event)
    plan.new_backfilled.append(backfilled)
    plan.auth.extend((event.event_id, auth_id, event.room_id) for auth_id in event.auth_event_ids)
    if event.rejected_reason is not None:
        plan.rejections.append((event.event_id, event.rejected_reason))
        _stop_being_backward_extremity(view, plan, event.room_id, event.event_id)
        return
    plan.edges.extend((event.event_id, prev, event.room_id) for prev in event.prev_event_ids)
    if not event.outlier:
        _link_into_room(view, plan, event, backfilled)


def _deoutlier(
    view: StoredView, plan: BatchPlan, event: PreparedEvent, stored: StoredEvent, backfilled: bool
) -> None:
    view.events[event.event_id] = StoredEvent(
        stored.room_id, False, stored.rejected, stored.stream_ordering, stored.depth
    )
    if stored.stream_ordering == PLANNED:
        # Planned as an outlier earlier in this batch: store it as a
        # non-outlier in the first place (one statement cannot update a row
        # that it inserts).
        index = next(i for i, e in enumerate(plan.new_events) if e.event_id == event.event_id)
        plan.new_events[index] = msgspec.structs.replace(plan.new_events[index], outlier=False)
    else:
        plan.deoutliered.append(event.event_id)
    if stored.rejected:
        return  # a re-send does not lift a rejection
    # Its edges were planned or written when it arrived as an outlier.
    _link_into_room(view, plan, event, backfilled)


def _link_into_room(
    view: StoredView, plan: BatchPlan, event: PreparedEvent, backfilled: bool
) -> None:
    room_id = event.room_id
    _stop_being_backward_extremity(view, plan, room_id, event.event_id)
    for prev in event.prev_event_ids:
        prev_stored = view.events.get(prev)
        if prev_stored is None or prev_stored.outlier:
            _become_backward_extremity(view, plan, room_id, prev)
    if backfilled:
        view.referenced.update(event.prev_event_ids)
        return
    forward = view.forward_extremities.setdefault(room_id, set())
    view.referenced.update(event.prev_event_ids)
    # Its prevs leave, and so does any extremity a stored event lists.
    _remove_forward(plan, forward, room_id, forward & view.referenced)
    if event.event_id not in view.referenced:
        forward.add(event.event_id)
        _record_change(plan.forward_added, plan.forward_removed, (room_id, event.event_id))


def _remove_forward(plan: BatchPlan, forward: set[str], room_id: str, prevs: Iterable[str]) -> None:
    for prev in prevs:
        if prev in forward:
            forward.discard(prev)
            _record_change(plan.forward_removed, plan.forward_added, (room_id, prev))


def _stop_being_backward_extremity(
    view: StoredView, plan: BatchPlan, room_id: str, event_id: str
) -> None:
    key = (room_id, event_id)
    if key in view.backward_extremities:
        view.backward_extremities.discard(key)
        _record_change(plan.backward_removed, plan.backward_added, key)


def _become_backward_extremity(
    view: StoredView, plan: BatchPlan, room_id: str, event_id: str
) -> None:
    key = (room_id, event_id)
    if key not in view.backward_extremities:
        view.backward_extremities.add(key)
        _record_change(plan.backward_added, plan.backward_removed, key)


def _record_change(
    changes: set[tuple[str, str]], opposite: set[tuple[str, str]], key: tuple[str, str]
) -> None:
    """A row added then removed in one batch (or the reverse) is no change."""
    if key in opposite:
        opposite.discard(key)
    else:
        changes.add(key)
