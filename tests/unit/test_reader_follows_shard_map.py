"""How the reader's writer set follows the shard map (contract sections 6 and 7).

A new writer joins at the minimum; a writer the map in force removed keeps
counting until it has announced the new epoch's `sequence_at_start`; a map
announced before its COMMIT only ever adds. The minimum never goes back.
"""

from __future__ import annotations

import msgspec

from persister.replication.messages import position_command
from persister.replication.reader import StreamState
from persister.replication.shardmap import (
    SHARDMAP,
    announcement,
    decode_announcement,
    encode_announcement,
)
from persister.sharding import ShardMap


def test_a_new_writer_joins_at_the_minimum_without_pulling_it_back() -> None:
    state = StreamState(["p1", "p2"], 0)
    state.apply(position_command("p1", 0, 30))
    state.apply(position_command("p2", 0, 20))
    assert state.apply_shard_map(["p1", "p2", "p3"], 25, in_force=True)
    assert state.complete_up_to() == 20
    assert state.positions() == {"p1": 30, "p2": 20, "p3": 20}
    assert state.db_range() == (0, 20)  # what p3 wrote before, from the database


def test_a_removed_writer_counts_until_it_announces_the_new_epochs_start() -> None:
    state = StreamState(["p1", "p2", "p3"], 0)
    state.apply(position_command("p1", 0, 40))
    state.apply(position_command("p2", 0, 40))
    state.apply(position_command("p3", 0, 10))
    state.apply_shard_map(["p1", "p2"], 30, in_force=True)
    assert state.leaving() == {"p3": 30}
    assert state.complete_up_to() == 10  # p3 may still have rows in (10, 30] to announce

    state.apply(position_command("p3", 10, 29))
    assert state.complete_up_to() == 29 and "p3" in state.writers

    state.apply(position_command("p3", 29, 30))
    assert state.writers == {"p1", "p2"}
    assert state.leaving() == {}
    assert state.complete_up_to() == 40


def test_a_removed_writer_already_past_the_start_leaves_at_once() -> None:
    state = StreamState(["p1", "p2"], 0)
    state.apply(position_command("p1", 0, 50))
    state.apply(position_command("p2", 0, 50))
    state.apply_shard_map(["p1"], 45, in_force=True)
    assert state.writers == {"p1"}
    assert state.complete_up_to() == 50


def test_a_stored_position_counts_as_the_removed_writers_announcement() -> None:
    state = StreamState(["p1", "p2"], 0)
    state.apply(position_command("p1", 0, 50))
    state.apply_shard_map(["p1"], 45, in_force=True)
    state.apply_stored_position("p2", 47)  # stored by a peer that announced for it
    assert state.writers == {"p1"}
    assert state.complete_up_to() == 50


def test_a_map_not_yet_in_force_only_adds_writers() -> None:
    state = StreamState(["p1", "p2"], 0)
    state.apply(position_command("p1", 0, 50))
    state.apply(position_command("p2", 0, 50))
    state.apply_shard_map(["p1", "p3"], 45, in_force=False)
    assert state.writers == {"p1", "p2", "p3"}
    assert state.leaving() == {}


def test_a_writer_added_back_stops_leaving() -> None:
    state = StreamState(["p1", "p2"], 0)
    state.apply_shard_map(["p1"], 45, in_force=True)
    state.apply_shard_map(["p1", "p2"], 60, in_force=False)
    assert state.leaving() == {}
    state.apply(position_command("p2", 0, 70))
    assert "p2" in state.writers


def test_removed_again_a_writer_waits_for_the_later_start() -> None:
    state = StreamState(["p1", "p2"], 0)
    state.apply_shard_map(["p1"], 45, in_force=True)
    state.apply_shard_map(["p1"], 80, in_force=True)
    assert state.leaving() == {"p2": 80}


def test_a_leaving_writer_known_to_owe_nothing_can_be_dropped_at_once() -> None:
    state = StreamState(["p1"], 0)
    state.apply(position_command("p1", 0, 10))
    state.apply_shard_map(["p1", "ghost"], 10, in_force=False)  # an install that rolls back
    state.apply_shard_map(["p1"], 45, in_force=True)  # the map in force, re-read
    state.apply(position_command("p1", 10, 50))
    assert state.leaving() == {"ghost": 45} and state.complete_up_to() == 10
    assert state.drop_leaving("ghost")
    assert state.writers == {"p1"} and state.complete_up_to() == 50
    assert not state.drop_leaving("ghost")


def test_the_minimum_never_moves_back_across_a_grow_and_a_shrink() -> None:
    state = StreamState(["p1", "p2"], 0)
    seen = [state.complete_up_to()]
    steps = [
        lambda: state.apply(position_command("p1", 0, 10)),
        lambda: state.apply(position_command("p2", 0, 12)),
        lambda: state.apply_shard_map(["p1", "p2", "p3"], 12, in_force=False),
        lambda: state.apply_shard_map(["p1", "p2", "p3"], 12, in_force=True),
        lambda: state.apply(position_command("p3", 9, 9)),  # a lower, older promise
        lambda: state.apply(position_command("p1", 10, 20)),
        lambda: state.apply_shard_map(["p1", "p3"], 20, in_force=True),
        lambda: state.apply(position_command("p3", 10, 25)),
        lambda: state.apply(position_command("p2", 12, 22)),
    ]
    for step in steps:
        step()
        seen.append(state.complete_up_to())
    assert seen == sorted(seen)
    assert state.writers == {"p1", "p3"} and state.complete_up_to() == 20


def test_shardmap_messages_round_trip_and_other_messages_are_not_shardmaps() -> None:
    shard_map = ShardMap(4, ("p1", "p2"), "rendezvous", {"!r:x": "p3"}, 1234)
    data = encode_announcement(shard_map, in_force=True)
    assert data.startswith(b'{"cmd":"' + SHARDMAP.encode() + b'"')
    decoded = decode_announcement(data)
    assert decoded == announcement(shard_map, in_force=True)
    assert decoded is not None and decoded.shard_map() == shard_map
    installing = msgspec.structs.replace(shard_map, sequence_at_start=None)
    early = decode_announcement(encode_announcement(installing, in_force=False))
    assert early is not None and early.shard_map() == installing
    assert decode_announcement(b'{"cmd":"POSITION","stream":"events"}') is None
    assert decode_announcement(b'{"cmd":"SHARDMAP","epoch":1,"writers":[],"sharding":"x"}') is None


def test_a_shardmap_without_the_new_fields_is_read_as_in_force() -> None:
    old = b'{"cmd":"SHARDMAP","epoch":2,"writers":["p1"],"sharding":"sha256","pins":{}}'
    decoded = decode_announcement(old)
    assert decoded is not None and decoded.in_force and decoded.sequence_at_start == 0
