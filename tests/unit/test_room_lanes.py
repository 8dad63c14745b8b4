"""`persister.writer.routing`: a room stays with the lane that holds any
of its requests, and is free again once that lane is done with all of them
(`RoomLanes`); the other rooms of an exchange go to one lane a
transaction's worth at a time (`Together`)."""

from __future__ import annotations

import pytest

from persister.writer.routing import RoomLanes, Together


def test_a_room_nobody_holds_has_no_lane() -> None:
    assert RoomLanes().lane_of("!a:example.org") is None


def test_a_room_stays_with_its_lane_until_every_request_it_holds_is_released() -> None:
    rooms = RoomLanes()
    rooms.hold("!a:example.org", 1)
    rooms.hold("!a:example.org", 1)
    rooms.release("!a:example.org")
    assert rooms.lane_of("!a:example.org") == 1
    rooms.release("!a:example.org")
    assert rooms.lane_of("!a:example.org") is None
    assert len(rooms) == 0


def test_a_room_held_by_one_lane_cannot_be_held_by_another() -> None:
    rooms = RoomLanes()
    rooms.hold("!a:example.org", 0)
    with pytest.raises(ValueError, match="held by lane 0"):
        rooms.hold("!a:example.org", 1)
    assert rooms.lane_of("!a:example.org") == 0


def test_rooms_are_held_apart() -> None:
    rooms = RoomLanes()
    rooms.hold("!a:example.org", 0)
    rooms.hold("!b:example.org", 1)
    rooms.release("!a:example.org")
    assert (rooms.lane_of("!a:example.org"), rooms.lane_of("!b:example.org")) == (None, 1)


def test_an_exchange_goes_to_one_lane_a_transactions_worth_at_a_time() -> None:
    chosen = iter([0, 1, 0])
    together = Together(lambda: next(chosen), max_events=100)
    lanes = [together.lane_for(events) for events in (50, 50, 1, 99, 60)]
    assert lanes == [0, 0, 1, 1, 0]


def test_a_request_bigger_than_a_transaction_still_goes_somewhere_alone() -> None:
    chosen = iter([0, 1])
    together = Together(lambda: next(chosen), max_events=100)
    assert [together.lane_for(events) for events in (500, 1)] == [0, 1]
