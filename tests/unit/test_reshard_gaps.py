"""How the reshard load reads a step's gaps (`persister.bench.reshard_load`)."""

from __future__ import annotations

from persister.bench.reshard_load import finished_rooms, gaps_at
from persister.bench.workload import BenchRequest

# Both rooms were acknowledged every 0.1 s up to 1.0 s; the step is 1.05-1.1 s.
ACKS = {"!a:x": [i / 10 for i in range(11)], "!b:x": [i / 10 for i in range(11)]}
TYPICAL = {"!a:x": 0.1, "!b:x": 0.1}


def request(room_id: str) -> BenchRequest:
    return BenchRequest(0, room_id, "10", False, False, (), ())


def test_a_room_silent_after_a_step_with_work_left_is_stalled() -> None:
    gaps = gaps_at(ACKS, TYPICAL, ["!a:x"], 1.05, 1.1, finished=frozenset())
    assert gaps.stalled == 1


def test_a_room_that_ran_out_of_requests_before_a_step_is_not_stalled() -> None:
    # A pinned room alone on its writer runs dry first; it has nothing to resume.
    planned = [request("!a:x")] * 11 + [request("!b:x")] * 12
    finished = finished_rooms(planned, ACKS)
    assert finished == {"!a:x"}
    assert gaps_at(ACKS, TYPICAL, ["!a:x"], 1.05, 1.1, finished).stalled == 0
    assert gaps_at(ACKS, TYPICAL, ["!b:x"], 1.05, 1.1, finished).stalled == 1
