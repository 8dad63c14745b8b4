"""What a lane remembers of its rooms (persister.writer.memory).

Memory may only plan a batch that loading would have planned the same way;
everything else (unknown rooms or prevs, duplicates, outliers, rejections,
backfill, another shard-map epoch) is left to loading.
"""

from __future__ import annotations

from typing import Any

from persister.dag import LinkRequest, StoredEvent, StoredView, link_batch
from persister.matrix.prepared import PreparedEvent
from persister.writer.memory import RoomsMemory
from tests.unit.test_dag import event as dag_event

ROOM = "!room:example.org"
OTHER = "!other:example.org"
EPOCH = 3


def event(event_id: str, *prevs: str, **fields: Any) -> PreparedEvent:
    return dag_event(event_id, prevs, **fields)


def request(*events: PreparedEvent, backfilled: bool = False) -> LinkRequest:
    return LinkRequest(events[0].room_id, "10", backfilled, events)


def loaded_and_committed(memory: RoomsMemory, links: list[LinkRequest], view: StoredView) -> None:
    """What the lane does with a loaded batch: link it, commit, remember."""
    plan = link_batch(view, links)
    orderings = {e.event_id: 100 + i for i, e in enumerate(plan.new_events)}
    memory.remember(links, view, orderings, EPOCH)


def memory_of_room_with_head(head: str = "$b") -> RoomsMemory:
    """A room whose create event `$a` and then `head` were written by this lane."""
    memory = RoomsMemory()
    empty = StoredView({}, {}, {}, set(), set())
    loaded_and_committed(memory, [request(event("$a"), event(head, "$a"))], empty)
    return memory


def test_a_room_the_lane_wrote_plans_its_next_events_without_loading() -> None:
    memory = memory_of_room_with_head()
    planned = memory.plan([request(event("$c", "$b"))], EPOCH)
    assert planned is not None
    view, plan = planned.view, planned.plan
    assert planned.forward_extremities == [(ROOM, "$b")]
    assert [e.event_id for e in plan.new_events] == ["$c"]
    assert plan.forward_removed == {(ROOM, "$b")}
    assert plan.forward_added == {(ROOM, "$c")}
    assert view.events["$b"] == StoredEvent(ROOM, False, False, 101, 1)


def test_memory_plans_exactly_what_loading_the_stored_rows_would() -> None:
    memory = memory_of_room_with_head()
    links = [request(event("$c", "$b")), request(event("$d", "$c"), event("$e", "$d", "$b"))]
    planned = memory.plan(links, EPOCH)
    assert planned is not None
    stored = StoredView(
        events={
            "$a": StoredEvent(ROOM, False, False, 100, 2),
            "$b": StoredEvent(ROOM, False, False, 101, 1),
        },
        room_versions={ROOM: "10"},
        forward_extremities={ROOM: {"$b"}},
        backward_extremities=set(),
        referenced=set(),
    )
    assert planned.plan == link_batch(stored, links)


def test_a_committed_batch_moves_the_remembered_forward_extremities() -> None:
    memory = memory_of_room_with_head()
    planned = memory.plan([request(event("$c", "$b"))], EPOCH)
    assert planned is not None
    memory.remember([request(event("$c", "$b"))], planned.view, {"$c": 102}, EPOCH)
    planned = memory.plan([request(event("$d", "$c"))], EPOCH)
    assert planned is not None
    assert planned.forward_extremities == [(ROOM, "$c")]
    assert planned.plan.forward_removed == {(ROOM, "$c")}


def test_a_room_never_written_is_loaded() -> None:
    memory = memory_of_room_with_head()
    assert memory.plan([request(event("$x", "$w", room_id=OTHER))], EPOCH) is None


def test_one_unknown_room_sends_the_whole_batch_to_loading() -> None:
    memory = memory_of_room_with_head()
    links = [request(event("$c", "$b")), request(event("$x", "$w", room_id=OTHER))]
    assert memory.plan(links, EPOCH) is None


def test_an_event_whose_prev_is_not_remembered_is_loaded() -> None:
    memory = memory_of_room_with_head()
    assert memory.plan([request(event("$c", "$old"))], EPOCH) is None


def test_a_resent_event_is_loaded_so_that_it_is_answered_as_a_duplicate() -> None:
    memory = memory_of_room_with_head()
    assert memory.plan([request(event("$b", "$a"))], EPOCH) is None
    assert memory.plan([request(event("$c", "$b"), event("$c", "$b"))], EPOCH) is None


def test_outliers_rejections_and_backfill_are_loaded() -> None:
    memory = memory_of_room_with_head()
    assert memory.plan([request(event("$c", "$b", outlier=True))], EPOCH) is None
    assert memory.plan([request(event("$c", "$b", rejected="auth"))], EPOCH) is None
    assert memory.plan([request(event("$c", "$b"), backfilled=True)], EPOCH) is None


def test_a_room_whose_forward_extremity_a_backfilled_event_lists_is_loaded() -> None:
    # The next event drops that extremity, which only loading can tell.
    memory = memory_of_room_with_head()
    view = StoredView(
        {"$b": StoredEvent(ROOM, False, False, 101, 1)}, {ROOM: "10"}, {ROOM: {"$b"}}, set(), set()
    )
    loaded_and_committed(memory, [request(event("$old", "$b"), backfilled=True)], view)
    assert memory.plan([request(event("$c", "$b"))], EPOCH) is None


def test_a_new_shard_map_epoch_forgets_every_room() -> None:
    memory = memory_of_room_with_head()
    assert memory.plan([request(event("$c", "$b"))], EPOCH + 1) is None
    assert len(memory) == 0
    assert memory.plan([request(event("$c", "$b"))], EPOCH) is None


def test_only_the_newest_events_of_a_room_are_kept() -> None:
    memory = RoomsMemory(events_per_room=2)
    empty = StoredView({}, {}, {}, set(), set())
    chain = [event("$a"), event("$b", "$a"), event("$c", "$b")]
    loaded_and_committed(memory, [request(*chain)], empty)
    assert memory.plan([request(event("$d", "$c"))], EPOCH) is not None
    assert memory.plan([request(event("$d", "$a"))], EPOCH) is None


def test_the_rooms_written_least_recently_are_forgotten_first() -> None:
    memory = RoomsMemory(rooms=1)
    empty = StoredView({}, {}, {}, set(), set())
    loaded_and_committed(memory, [request(event("$a"))], empty)
    loaded_and_committed(memory, [request(event("$x", room_id=OTHER))], empty)
    assert memory.plan([request(event("$b", "$a"))], EPOCH) is None
    assert memory.plan([request(event("$y", "$x", room_id=OTHER))], EPOCH) is not None


def test_forgetting_sends_every_room_back_to_loading() -> None:
    memory = memory_of_room_with_head()
    memory.forget()
    assert memory.plan([request(event("$c", "$b"))], EPOCH) is None
