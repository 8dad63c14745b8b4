"""The DAG rules of contract section 4, one test per rule."""

from __future__ import annotations

from persister.dag import (
    PLANNED,
    BatchPlan,
    LinkRequest,
    StoredEvent,
    StoredView,
    link_batch,
)
from persister.errors import InvalidEvent
from persister.matrix.prepared import PreparedEvent

ROOM = "!room:example.org"


def event(
    event_id: str,
    prevs: tuple[str, ...] = (),
    *,
    outlier: bool = False,
    rejected: str | None = None,
    depth: int = 1,
    room_id: str = ROOM,
    auth: tuple[str, ...] = (),
) -> PreparedEvent:
    return PreparedEvent(
        event_id=event_id,
        room_id=room_id,
        type="m.room.message",
        state_key=None,
        sender="@a:example.org",
        origin_server_ts=0,
        depth=depth,
        prev_event_ids=prevs,
        auth_event_ids=auth,
        outlier=outlier,
        rejected_reason=rejected,
        json="{}",
    )


def view(
    stored: dict[str, StoredEvent] | None = None,
    forward: set[str] | None = None,
    backward: set[str] | None = None,
    referenced: set[str] | None = None,
) -> StoredView:
    return StoredView(
        events=stored or {},
        room_versions={ROOM: "10"} if stored else {},
        forward_extremities={ROOM: set(forward or ())},
        backward_extremities={(ROOM, e) for e in backward or ()},
        referenced=set(referenced or ()),
    )


def stored(
    ordering: int, *, outlier: bool = False, rejected: bool = False, room_id: str = ROOM
) -> StoredEvent:
    return StoredEvent(room_id, outlier, rejected, ordering, 1)


def link(v: StoredView, *events: PreparedEvent, backfilled: bool = False) -> BatchPlan:
    return link_batch(v, [LinkRequest(ROOM, "10", backfilled, list(events))])


def forward_after(v: StoredView) -> set[str]:
    return v.forward_extremities[ROOM]


def test_first_event_of_a_room_becomes_its_only_forward_extremity() -> None:
    v = view()
    plan = link(v, event("$a"))
    assert forward_after(v) == {"$a"}
    assert plan.forward_added == {(ROOM, "$a")}
    assert plan.new_rooms == {ROOM: "10"}


def test_an_event_replaces_the_forward_extremities_it_lists_as_prev_events() -> None:
    v = view({"$a": stored(1), "$b": stored(2)}, forward={"$a", "$b"})
    plan = link(v, event("$c", ("$a", "$b")))
    assert forward_after(v) == {"$c"}
    assert plan.forward_removed == {(ROOM, "$a"), (ROOM, "$b")}
    assert plan.edges == [("$c", "$a", ROOM), ("$c", "$b", ROOM)]


def test_a_fork_leaves_two_forward_extremities() -> None:
    v = view({"$a": stored(1)}, forward={"$a"})
    link(v, event("$b", ("$a",)), event("$c", ("$a",)))
    assert forward_after(v) == {"$b", "$c"}


def test_an_unknown_prev_event_becomes_a_backward_extremity() -> None:
    v = view()
    plan = link(v, event("$b", ("$missing",)))
    assert plan.backward_added == {(ROOM, "$missing")}


def test_an_outlier_prev_event_becomes_a_backward_extremity() -> None:
    v = view({"$o": stored(1, outlier=True)})
    plan = link(v, event("$b", ("$o",)))
    assert plan.backward_added == {(ROOM, "$o")}


def test_an_arriving_backward_extremity_stops_being_one() -> None:
    v = view({"$b": stored(2)}, forward={"$b"}, backward={"$a"}, referenced={"$a"})
    plan = link(v, event("$a"))
    assert plan.backward_removed == {(ROOM, "$a")}


def test_an_event_already_listed_as_prev_by_a_stored_event_is_not_a_forward_extremity() -> None:
    v = view({"$b": stored(2)}, forward={"$b"}, backward={"$a"}, referenced={"$a"})
    link(v, event("$a"))
    assert forward_after(v) == {"$b"}


def test_an_outlier_changes_no_extremity() -> None:
    v = view({"$a": stored(1)}, forward={"$a"})
    plan = link(v, event("$o", ("$a", "$missing"), outlier=True))
    assert forward_after(v) == {"$a"}
    assert not plan.forward_added and not plan.forward_removed
    assert not plan.backward_added
    assert plan.new_events[0].outlier


def test_rejected_event_is_never_a_forward_extremity() -> None:
    v = view({"$a": stored(1)}, forward={"$a"})
    plan = link(v, event("$r", ("$a",), rejected="auth_error"))
    assert forward_after(v) == {"$a"}
    assert plan.rejections == [("$r", "auth_error")]
    assert plan.edges == []


def test_rejected_events_do_not_hide_their_prevs_from_later_events() -> None:
    v = view({"$a": stored(1)}, forward={"$a"})
    link(v, event("$r", ("$a",), rejected="auth_error"), event("$b", ("$a",)))
    assert forward_after(v) == {"$b"}


def test_backfilled_events_never_change_forward_extremities() -> None:
    v = view({"$a": stored(5)}, forward={"$a"}, backward={"$z"}, referenced={"$z"})
    plan = link(v, event("$z", ("$y",)), backfilled=True)
    assert forward_after(v) == {"$a"}
    assert not plan.forward_added and not plan.forward_removed
    assert plan.backward_removed == {(ROOM, "$z")}
    assert plan.backward_added == {(ROOM, "$y")}
    assert plan.new_backfilled == [True]


def test_a_stored_event_is_a_duplicate_and_changes_nothing() -> None:
    v = view({"$a": stored(7)}, forward={"$a"})
    plan = link(v, event("$a"))
    assert plan.new_events == []
    outcome = plan.outcomes[0]
    assert not isinstance(outcome, InvalidEvent)
    assert outcome[0].duplicate and outcome[0].stored_ordering == 7


def test_a_repeated_event_within_one_request_is_stored_once() -> None:
    v = view()
    plan = link(v, event("$a"), event("$a"))
    assert [e.event_id for e in plan.new_events] == ["$a"]
    outcome = plan.outcomes[0]
    assert not isinstance(outcome, InvalidEvent)
    assert [o.duplicate for o in outcome] == [False, True]
    assert outcome[1].stored_ordering == PLANNED


def test_an_outlier_arriving_as_a_timeline_event_is_deoutliered_in_place() -> None:
    v = view({"$p": stored(1)}, forward={"$p"})
    v.events["$o"] = stored(9, outlier=True)
    plan = link(v, event("$o", ("$p",)))
    assert plan.deoutliered == ["$o"]
    assert plan.new_events == []
    assert forward_after(v) == {"$o"}
    outcome = plan.outcomes[0]
    assert not isinstance(outcome, InvalidEvent)
    assert outcome[0].stored_ordering == 9 and not outcome[0].duplicate


def test_a_later_request_in_the_batch_sees_what_an_earlier_one_planned() -> None:
    v = view()
    plan = link_batch(
        v,
        [
            LinkRequest(ROOM, "10", False, [event("$a")]),
            LinkRequest(ROOM, "10", False, [event("$b", ("$a",))]),
        ],
    )
    assert forward_after(v) == {"$b"}
    # $a was added then removed in one batch: no row to write for it.
    assert plan.forward_added == {(ROOM, "$b")} and plan.forward_removed == set()
    assert plan.backward_added == set()


def test_a_room_version_mismatch_fails_only_that_request() -> None:
    v = view({"$a": stored(1)}, forward={"$a"})
    plan = link_batch(
        v,
        [
            LinkRequest(ROOM, "9", False, [event("$x", ("$a",))]),
            LinkRequest(ROOM, "10", False, [event("$b", ("$a",))]),
        ],
    )
    assert isinstance(plan.outcomes[0], InvalidEvent)
    assert "room_version" in str(plan.outcomes[0])
    assert [e.event_id for e in plan.new_events] == ["$b"]


def test_an_event_id_stored_in_another_room_is_refused() -> None:
    v = view({"$a": stored(1, room_id="!other:example.org")})
    plan = link(v, event("$a"))
    assert isinstance(plan.outcomes[0], InvalidEvent)
    assert plan.new_events == []


def test_auth_events_become_auth_edges_even_for_rejected_events() -> None:
    v = view()
    plan = link(v, event("$r", rejected="bad", auth=("$c", "$m")))
    assert plan.auth == [("$r", "$c", ROOM), ("$r", "$m", ROOM)]


def test_an_event_sent_as_outlier_then_as_timeline_event_in_one_batch_is_stored_as_timeline() -> (
    None
):
    v = view()
    plan = link_batch(
        v,
        [
            LinkRequest(ROOM, "10", False, [event("$a", outlier=True)]),
            LinkRequest(ROOM, "10", False, [event("$a")]),
        ],
    )
    assert [(e.event_id, e.outlier) for e in plan.new_events] == [("$a", False)]
    assert plan.deoutliered == []
    assert forward_after(v) == {"$a"}


def test_a_rejected_outlier_sent_again_as_a_timeline_event_stays_rejected() -> None:
    v = view({"$p": stored(1)}, forward={"$p"})
    v.events["$o"] = stored(9, outlier=True, rejected=True)
    plan = link(v, event("$o", ("$p",)))
    assert plan.deoutliered == ["$o"]
    assert forward_after(v) == {"$p"}
    assert not plan.forward_added and not plan.forward_removed
    assert v.events["$o"].rejected and not v.events["$o"].outlier


def test_an_outlier_sent_again_in_a_backfilled_request_changes_no_forward_extremity() -> None:
    v = view({"$c": stored(1)}, forward={"$c"})
    v.events["$o"] = stored(9, outlier=True)
    plan = link(v, event("$o", ("$c",)), backfilled=True)
    assert plan.deoutliered == ["$o"]
    assert forward_after(v) == {"$c"}
    assert not plan.forward_added and not plan.forward_removed


def test_a_forward_extremity_a_backfilled_event_lists_leaves_with_the_next_event() -> None:
    v = view({"$c": stored(1)}, forward={"$c"})
    link(v, event("$bx", ("$c",)), backfilled=True)
    assert forward_after(v) == {"$c"}  # backfill itself changes nothing
    plan = link(v, event("$fz", ("$bx",)))
    assert forward_after(v) == {"$fz"}
    assert plan.forward_removed == {(ROOM, "$c")}


def test_a_forward_extremity_a_stored_event_lists_leaves_with_the_next_event() -> None:
    # As loaded: a backfilled event committed earlier lists $c.
    v = view({"$c": stored(1), "$bx": stored(-1)}, forward={"$c"}, referenced={"$c"})
    plan = link(v, event("$fz", ("$bx",)))
    assert forward_after(v) == {"$fz"}
    assert plan.forward_removed == {(ROOM, "$c")}


def test_a_backward_extremity_arriving_as_a_rejected_event_stops_being_one() -> None:
    v = view({"$x": stored(2)}, forward={"$x"}, backward={"$p"}, referenced={"$p"})
    plan = link(v, event("$p", rejected="auth_error"))
    assert plan.backward_removed == {(ROOM, "$p")}
    assert forward_after(v) == {"$x"}
