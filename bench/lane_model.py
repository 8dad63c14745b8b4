"""A queueing model of a persister's writer lanes, for target (b) of issue 6.

What persist latency would an open loop see at a given rate, if a
transaction of n events took `a + b * n` milliseconds and nothing else
slowed anything down? It answers "how much faster must a transaction get
for p99 <= 15 ms at half of max throughput" without a noisy machine in the
way, and compares how requests are spread over lanes:

- static: each room always goes to the lane its hash picks (the persister
  today, `persister/writer/service.py`);
- pooled: any idle lane takes the queued requests of rooms that no other
  lane is writing, in arrival order (tried in the eighth session and not
  kept: bench/README.md says why);
- one lane.

Like the harness: Poisson arrivals of K-event requests over R rooms with
Zipf-distributed activity, and one request in flight per room (the
creator client sends a room's next request once the previous one is
answered). A lane takes everything queued for it, up to `--cap` events.

    .venv/bin/python bench/lane_model.py --rate 10900 --a 3.0 --b 0.07
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import random
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Policy = Literal["static", "pooled", "one-lane"]


@dataclass(frozen=True)
class Model:
    rate_events_per_s: float
    a_ms: float  # per transaction
    b_ms: float  # per event
    events_per_request: int = 50
    rooms: int = 1000
    zipf_s: float = 1.0
    lanes: int = 2
    cap_events: int = 1000
    duration_s: float = 60.0
    warmup_s: float = 5.0
    seed: int = 1


@dataclass
class _Lanes:
    """Queued requests (room, arrival time) and what each lane is writing."""

    policy: Policy
    count: int
    queues: list[deque[tuple[int, float]]] = field(default_factory=list)
    writing: list[set[int] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queues = [deque() for _ in range(1 if self.policy == "pooled" else self.count)]
        self.writing = [None] * self.count

    def put(self, room: int, arrived: float) -> None:
        self.queues[0 if self.policy == "pooled" else room % self.count].append((room, arrived))

    def take(self, lane: int, cap_events: int, k: int) -> list[tuple[int, float]]:
        if self.policy != "pooled":
            queue = self.queues[lane]
            batch: list[tuple[int, float]] = []
            while queue and (len(batch) + 1) * k <= cap_events:
                batch.append(queue.popleft())
            return batch
        others = {room for i, rooms in enumerate(self.writing) if i != lane and rooms
                  for room in rooms}  # fmt: skip
        batch, left = [], deque[tuple[int, float]]()
        for request in self.queues[0]:
            if request[0] in others or (len(batch) + 1) * k > cap_events:
                left.append(request)
            else:
                batch.append(request)
        self.queues[0] = left
        return batch


# (time, tie-breaker, lane or -1 for an arrival, room, arrived)
Event = tuple[float, int, int, int, float]


def _arrivals(model: Model) -> list[Event]:
    """Poisson arrivals of requests, each in a Zipf-chosen room; a heap."""
    rng = random.Random(model.seed)
    weights = [1 / (i + 1) ** model.zipf_s for i in range(model.rooms)]
    total = sum(weights)
    cumulative, running = [], 0.0
    for weight in weights:
        running += weight / total
        cumulative.append(running)
    events: list[Event] = []
    now = 0.0
    request_rate = model.rate_events_per_s / model.events_per_request
    while now < model.duration_s:
        now += rng.expovariate(request_rate)
        room = min(bisect.bisect_left(cumulative, rng.random()), model.rooms - 1)
        events.append((now, len(events), -1, room, now))
    heapq.heapify(events)
    return events


def latencies_ms(model: Model, policy: Policy) -> list[float]:
    """Persist latency (arrival at the client to answer) of every request
    that arrived after the warm-up, sorted."""
    lanes = _Lanes(policy, 1 if policy == "one-lane" else model.lanes)
    per_room: defaultdict[int, deque[float]] = defaultdict(deque)
    sending: set[int] = set()
    events = _arrivals(model)
    tie = len(events)
    batches: dict[int, list[tuple[int, float]]] = {}
    answered: list[float] = []

    def start_idle_lanes(at: float) -> None:
        nonlocal tie
        for lane in range(lanes.count):
            if lanes.writing[lane] is not None:
                continue
            batch = lanes.take(lane, model.cap_events, model.events_per_request)
            if not batch:
                continue
            lanes.writing[lane] = {room for room, _ in batch}
            batches[lane] = batch
            took = model.a_ms + model.b_ms * len(batch) * model.events_per_request
            tie += 1
            heapq.heappush(events, (at + took / 1000, tie, lane, -1, 0.0))

    while events:
        at, _, lane, room, arrived = heapq.heappop(events)
        if lane < 0:  # an arrival at the client
            if room in sending:
                per_room[room].append(arrived)
            else:
                sending.add(room)
                lanes.put(room, arrived)
        else:  # a lane committed
            lanes.writing[lane] = None
            for done_room, done_arrived in batches.pop(lane):
                if done_arrived >= model.warmup_s:
                    answered.append((at - done_arrived) * 1000)
                if per_room[done_room]:
                    lanes.put(done_room, per_room[done_room].popleft())
                else:
                    sending.discard(done_room)
        start_idle_lanes(at)
    return sorted(answered)


def quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10900.0, help="offered events/s")
    parser.add_argument("--a", type=float, default=3.0, help="ms per transaction")
    parser.add_argument("--b", type=float, default=0.07, help="ms per event")
    parser.add_argument("--batch", type=int, default=50, help="events per request")
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--cap", type=int, default=1000, help="most events per transaction")
    args = parser.parse_args()
    model = Model(args.rate, args.a, args.b, args.batch, zipf_s=args.zipf, lanes=args.lanes,
                  cap_events=args.cap)  # fmt: skip
    print(f"{args.rate:g} events/s in {args.batch}-event requests; a transaction of n "
          f"events takes {args.a:g} + {args.b:g} n ms")  # fmt: skip
    for policy in ("static", "pooled", "one-lane"):
        ordered = latencies_ms(model, policy)
        print(f"{policy:9} p50 {quantile(ordered, 0.5):6.1f} ms  p99 "
              f"{quantile(ordered, 0.99):6.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
