"""Reproducible Matrix-like workloads, generated before any timing starts.

The shape follows issue 6:

- R rooms whose activity is Zipf-distributed: event slot i goes to room r
  with weight 1/(r+1)^s, so a few rooms are huge and most are quiet.
- Each room starts with its create event and the state every room has
  (creator's join, power levels, join rules), sent as one request.
- Busy rooms (the top `busy_fraction` by weight) have `senders_busy`
  concurrent senders, quiet rooms `senders_quiet`. Concurrent senders fork the
  DAG (an event that has the same prevs as the previous one) and merge it
  (an event that lists up to `max_prevs` forward extremities).
- Sizes: mostly 200 B - 2 KB `m.room.message`s (or all `message_bytes` long),
  some state events, a few near the 64 KB limit.
- Optionally a share of backfilled history and of resent (already
  acknowledged) requests.

Every event is built by `persister.matrix.builder.build_pdu`, so it is a
valid PDU with its real event ID. The same seed gives the same DAG shapes
and sizes; `run_id` goes into room IDs and create events so that a second
run against the same database sends new events rather than duplicates.
"""

from __future__ import annotations

import base64
import itertools
import random
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from persister import wire
from persister.matrix.prepared import PreparedEvent

SERVER = "bench.example"
# Under the 65,536-byte limit with room for IDs and hashes to vary.
BIG_EVENT_BYTES = 60_000
MIXED_MIN_BYTES = 200
MIXED_MAX_BYTES = 2_000
# A resized event within this many bytes of its target is not rebuilt.
SIZE_TOLERANCE = 48
BASE_TS = 1_700_000_000_000
SETUP_EVENTS = 4
STATE_TYPES = ("m.room.topic", "m.room.name", "m.room.member")


@dataclass(frozen=True)
class WorkloadSpec:
    rooms: int = 1000
    # Event slots drawn from the Zipf distribution; every active room adds
    # its setup events on top, so the total is a little higher.
    events: int = 50_000
    batch: int = 50
    zipf_s: float = 1.0
    room_versions: tuple[str, ...] = ("10",)
    busy_fraction: float = 0.05
    senders_busy: int = 8
    senders_quiet: int = 2
    fork_rate: float = 0.05
    merge_rate: float = 0.5
    max_prevs: int = 10
    state_share: float = 0.08
    big_share: float = 0.002
    # None: the mixed 200 B - 2 KB distribution; else every message this long.
    message_bytes: int | None = None
    backfill_share: float = 0.0
    resend_share: float = 0.0
    seed: int = 1
    run_id: str = "bench"


class GenEvent(msgspec.Struct, frozen=True, gc=False):
    """One generated event: the PDU bytes and the columns derived from it."""

    event_id: str
    room_id: str
    type: str
    state_key: str | None
    sender: str
    origin_server_ts: int
    depth: int
    prev_event_ids: tuple[str, ...]
    auth_event_ids: tuple[str, ...]
    pdu_json: bytes


class BenchRequest(msgspec.Struct, frozen=True):
    seq: int
    room_id: str
    room_version: str
    backfilled: bool
    # A copy of an earlier request of the room: every result is a duplicate.
    resend: bool
    events: tuple[GenEvent, ...]
    envelopes: tuple[wire.EventEnvelope, ...]


class WorkloadSummary(msgspec.Struct):
    rooms_active: int
    events_unique: int
    events_sent: int
    requests: int
    backfill_requests: int
    resend_requests: int
    state_events: int
    big_events: int
    forks: int
    merges: int
    mean_event_bytes: float
    max_event_bytes: int
    top_room_share: float
    room_versions: dict[str, int]


@dataclass
class Workload:
    spec: WorkloadSpec
    requests: list[BenchRequest]
    summary: WorkloadSummary

    def unique_events(self) -> list[GenEvent]:
        """Each event once, in first-send order (resends skipped)."""
        return [e for r in self.requests if not r.resend for e in r.events]


def prepared(event: GenEvent) -> PreparedEvent:
    """The event as the HTTP layer hands it to the writer, for micro-benchmarks
    that start after validation."""
    return PreparedEvent(
        event.event_id, event.room_id, event.type, event.state_key, event.sender,
        event.origin_server_ts, event.depth, event.prev_event_ids, event.auth_event_ids,
        outlier=False, rejected_reason=None, json=event.pdu_json.decode(),
    )  # fmt: skip


@dataclass
class _RoomResult:
    index: int
    room_id: str
    room_version: str
    events: list[GenEvent]
    forks: int
    merges: int


@dataclass
class _RoomJob:
    spec: WorkloadSpec
    index: int
    slots: int


def generate(spec: WorkloadSpec, workers: int = 1) -> Workload:
    """Build the whole workload; `workers` > 1 builds rooms in processes."""
    positions = _slot_positions(spec)
    jobs = [_RoomJob(spec, index, len(slots)) for index, slots in positions.items()]
    rooms = _build_rooms(jobs, workers)
    rng = random.Random(f"{spec.seed}:order")
    timed: list[tuple[int, int, int, _PlannedRequest]] = []
    for room in rooms:
        planned = _room_requests(spec, room, positions[room.index], rng)
        timed.extend((t, room.index, j, p) for j, (t, p) in enumerate(planned))
    timed.sort(key=lambda item: item[:3])
    requests = [_finish(seq, item[3]) for seq, item in enumerate(timed)]
    return Workload(spec, requests, _summarise(spec, rooms, requests))


def _slot_positions(spec: WorkloadSpec) -> dict[int, list[int]]:
    """For each room that gets any activity, the slots (global times) it owns."""
    rng = random.Random(f"{spec.seed}:zipf")
    weights = [1.0 / (rank + 1) ** spec.zipf_s for rank in range(spec.rooms)]
    cumulative = list(itertools.accumulate(weights))
    positions: dict[int, list[int]] = {}
    for slot, room in enumerate(
        rng.choices(range(spec.rooms), cum_weights=cumulative, k=spec.events)
    ):
        positions.setdefault(room, []).append(slot)
    return positions


def _build_rooms(jobs: list[_RoomJob], workers: int) -> list[_RoomResult]:
    if workers <= 1 or len(jobs) < 2:
        return [_build_room(job) for job in jobs]
    # Rooms are independent, so they split across processes; big rooms are
    # interleaved with small ones so that no process gets all the work.
    chunk = max(1, len(jobs) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_build_room, jobs, chunksize=chunk))


def _build_room(job: _RoomJob) -> _RoomResult:
    spec = job.spec
    version = spec.room_versions[job.index % len(spec.room_versions)]
    busy = job.index < max(1, int(spec.rooms * spec.busy_fraction))
    gen = _RoomGen(spec, job.index, version, busy)
    gen.setup()
    # The first slot is the setup request; each further slot one event.
    for _ in range(job.slots - 1):
        gen.next_event()
    return _RoomResult(job.index, gen.room_id, version, gen.events, gen.forks, gen.merges)


class _RoomGen:
    """One room's DAG, grown event by event with forks and merges."""

    def __init__(self, spec: WorkloadSpec, index: int, version: str, busy: bool) -> None:
        self.spec = spec
        self.version = version
        self.rng = random.Random(f"{spec.seed}:room:{index}")
        count = spec.senders_busy if busy else spec.senders_quiet
        self.senders = [f"@u{index}.{k}:{SERVER}" for k in range(max(1, count))]
        self.room_id = f"!r{index}.{spec.run_id}:{SERVER}"
        self.events: list[GenEvent] = []
        self.depths: dict[str, int] = {}
        self.extremities: list[str] = []
        self.last_prevs: tuple[str, ...] = ()
        self.state: dict[tuple[str, str], str] = {}
        self.forks = 0
        self.merges = 0
        # Bytes of an event besides its message body, learnt as we go.
        self.overhead = 400

    # -- the room's first request -----------------------------------------

    def setup(self) -> None:
        creator = self.senders[0]
        content: dict[str, Any] = {
            "room_version": self.version,
            "io.persister.bench": self.spec.run_id,
        }
        if self.version in ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10"):
            content["creator"] = creator  # dropped from create events in v11
        self._add("m.room.create", content, creator, "")
        self._add("m.room.member", {"membership": "join"}, creator, creator)
        users = {sender: 100 if sender == creator else 0 for sender in self.senders}
        self._add("m.room.power_levels", {"users": users, "users_default": 0}, creator, "")
        self._add("m.room.join_rules", {"join_rule": "public"}, creator, "")

    # -- steady state -----------------------------------------------------------

    def next_event(self) -> None:
        sender = self.rng.choice(self.senders)
        if ("m.room.member", sender) not in self.state:
            self._add("m.room.member", {"membership": "join"}, sender, sender)
            return
        roll = self.rng.random()
        if roll < self.spec.big_share:
            self._message(sender, BIG_EVENT_BYTES, exact=True)
        elif roll < self.spec.big_share + self.spec.state_share:
            self._state_change(sender)
        else:
            self._message(sender, *self._message_size())

    def _message_size(self) -> tuple[int, bool]:
        if self.spec.message_bytes is not None:
            return self.spec.message_bytes, True
        # Log-uniform: short messages are much more common than long ones.
        low, high = MIXED_MIN_BYTES, MIXED_MAX_BYTES
        return int(low * (high / low) ** self.rng.random()), False

    def _state_change(self, sender: str) -> None:
        kind = self.rng.choice(STATE_TYPES)
        if kind == "m.room.member":
            content = {"membership": "join", "displayname": self._text(self.rng.randint(4, 30))}
            self._add(kind, content, sender, sender)
        elif kind == "m.room.topic":
            self._add(kind, {"topic": self._text(self.rng.randint(20, 300))}, sender, "")
        else:
            self._add(kind, {"name": self._text(self.rng.randint(4, 40))}, sender, "")

    def _message(self, sender: str, target: int, exact: bool) -> None:
        body_len = max(1, target - self.overhead)
        prevs = self._prevs()
        event = self._build("m.room.message", self._body(body_len), sender, None, prevs)
        error = len(event.pdu_json) - target
        self.overhead = len(event.pdu_json) - body_len
        if exact and abs(error) > SIZE_TOLERANCE:
            # The first message of a room, or one with many more prevs.
            body_len = max(1, body_len - error)
            event = self._build("m.room.message", self._body(body_len), sender, None, prevs)
        self._append(event)

    def _body(self, length: int) -> dict[str, Any]:
        return {"msgtype": "m.text", "body": self._text(length)}

    def _text(self, length: int) -> str:
        # Random bytes, so that PostgreSQL's TOAST compression cannot make
        # big events cheaper than real ones; base64 needs no JSON escaping.
        raw = self.rng.randbytes(length * 3 // 4 + 3)
        return base64.b64encode(raw).decode("ascii")[:length]

    # -- the DAG ---------------------------------------------------------------

    def _prevs(self) -> tuple[str, ...]:
        if not self.events:
            return ()
        if len(self.senders) > 1 and self.last_prevs and self.rng.random() < self.spec.fork_rate:
            # A second sender did not see the previous event yet.
            self.forks += 1
            return self.last_prevs
        if len(self.extremities) > 1 and self.rng.random() < self.spec.merge_rate:
            self.merges += 1
            return tuple(self.extremities[-self.spec.max_prevs :])
        return (self.events[-1].event_id,)

    def _auth(self, event_type: str, state_key: str | None, sender: str) -> tuple[str, ...]:
        keys = [("m.room.create", ""), ("m.room.power_levels", "")]
        if event_type == "m.room.member" and ("m.room.member", sender) not in self.state:
            keys.append(("m.room.join_rules", ""))
        else:
            keys.append(("m.room.member", sender))
        if self.version == "12":
            keys = keys[1:]  # v12 never lists the create event
        return tuple(self.state[k] for k in keys if k in self.state)

    def _add(
        self, event_type: str, content: dict[str, Any], sender: str, state_key: str | None
    ) -> None:
        self._append(self._build(event_type, content, sender, state_key, self._prevs()))

    def _build(
        self,
        event_type: str,
        content: dict[str, Any],
        sender: str,
        state_key: str | None,
        prevs: tuple[str, ...],
    ) -> GenEvent:
        from persister.matrix.builder import build_pdu

        depth = 1 + max((self.depths[p] for p in prevs), default=0)
        auth = self._auth(event_type, state_key, sender)
        ts = BASE_TS + len(self.events) * 1000
        derived = event_type == "m.room.create" and self.version == "12"
        event_id, pdu = build_pdu(
            self.version,
            None if derived else self.room_id,
            sender,
            event_type,
            content,
            list(prevs),
            list(auth),
            depth,
            state_key=state_key,
            origin_server_ts=ts,
            event_id=self._chosen_id(),
        )
        if derived:
            self.room_id = "!" + event_id[1:]
        return GenEvent(
            event_id,
            self.room_id,
            event_type,
            state_key,
            sender,
            ts,
            depth,
            prevs,
            auth,
            msgspec.json.encode(pdu),
        )

    def _chosen_id(self) -> str | None:
        """v1/v2 senders choose event IDs; drawn from the room's RNG to stay
        reproducible (the builder would pick random ones)."""
        if self.version not in ("1", "2"):
            return None
        return f"${self.rng.randbytes(12).hex()}.{self.spec.run_id}:{SERVER}"

    def _append(self, event: GenEvent) -> None:
        self.events.append(event)
        self.depths[event.event_id] = event.depth
        prevs = set(event.prev_event_ids)
        self.extremities = [e for e in self.extremities if e not in prevs]
        self.extremities.append(event.event_id)
        self.last_prevs = event.prev_event_ids
        if event.state_key is not None:
            self.state[(event.type, event.state_key)] = event.event_id


# -- cutting rooms into requests ---------------------------------------------


@dataclass
class _PlannedRequest:
    room: _RoomResult
    backfilled: bool
    resend: bool
    events: Sequence[GenEvent]
    envelopes: tuple[wire.EventEnvelope, ...] = field(default=())


def _room_requests(
    spec: WorkloadSpec, room: _RoomResult, slots: list[int], rng: random.Random
) -> list[tuple[int, _PlannedRequest]]:
    """The room's requests in the order they must be sent, each with its time.

    An event's time is the slot it was drawn in (the setup events share the
    room's first slot); a request leaves when its last event exists.
    """
    history, forward = _split_history(spec, room.events)
    times = [slots[max(0, k - (SETUP_EVENTS - 1))] for k in range(len(room.events))]
    index = {e.event_id: k for k, e in enumerate(room.events)}
    planned: list[tuple[int, _PlannedRequest]] = []
    for chunk in _chunks(forward, spec.batch, first=SETUP_EVENTS):
        planned.append(
            (times[index[chunk[-1].event_id]], _PlannedRequest(room, False, False, chunk))
        )
    planned = _with_resends(spec, planned, rng)
    return _with_backfill(spec, room, planned, history, rng)


def _split_history(
    spec: WorkloadSpec, events: list[GenEvent]
) -> tuple[list[GenEvent], list[GenEvent]]:
    """The backfilled share of a room is a run of events after its setup:
    the forward stream skips them, so its next event has unknown prevs."""
    steady = len(events) - SETUP_EVENTS
    count = round(spec.backfill_share * steady) if steady > 1 else 0
    history = events[SETUP_EVENTS : SETUP_EVENTS + count]
    return history, events[:SETUP_EVENTS] + events[SETUP_EVENTS + count :]


def _chunks(events: Sequence[GenEvent], size: int, first: int) -> list[Sequence[GenEvent]]:
    """The setup events always go alone as the first request of a room."""
    chunks: list[Sequence[GenEvent]] = [events[:first]] if events else []
    chunks.extend(events[i : i + size] for i in range(first, len(events), size))
    return [c for c in chunks if c]


def _with_resends(
    spec: WorkloadSpec, planned: list[tuple[int, _PlannedRequest]], rng: random.Random
) -> list[tuple[int, _PlannedRequest]]:
    if spec.resend_share <= 0:
        return planned
    out: list[tuple[int, _PlannedRequest]] = []
    for j, (t, request) in enumerate(planned):
        out.append((t, request))
        if j > 0 and rng.random() < spec.resend_share:
            # Sent after request j, which follows the copied one: the
            # original is acknowledged before its copy leaves.
            _, original = planned[rng.randrange(j)]
            out.append((t, _PlannedRequest(original.room, False, True, original.events)))
    return out


def _with_backfill(
    spec: WorkloadSpec,
    room: _RoomResult,
    planned: list[tuple[int, _PlannedRequest]],
    history: list[GenEvent],
    rng: random.Random,
) -> list[tuple[int, _PlannedRequest]]:
    if not history:
        return planned
    # Synapse backfills newest history first, one chunk at a time.
    chunks = [history[i : i + spec.batch] for i in range(0, len(history), spec.batch)][::-1]
    after_setup = [t for t, _ in planned[1:]] or [planned[0][0]]
    times = sorted(rng.choice(after_setup) for _ in chunks)
    backfill = [
        (t, _PlannedRequest(room, True, False, c)) for t, c in zip(times, chunks, strict=True)
    ]
    # A stable merge keeps forward order; backfill goes after the forward
    # request of the same time (and the setup request always goes first).
    merged = sorted([*planned, *backfill], key=lambda item: (item[0], item[1].backfilled))
    return merged


def _finish(seq: int, planned: _PlannedRequest) -> BenchRequest:
    envelopes = tuple(
        wire.EventEnvelope(pdu=msgspec.Raw(e.pdu_json), event_id=e.event_id) for e in planned.events
    )
    room = planned.room
    return BenchRequest(
        seq,
        room.room_id,
        room.room_version,
        planned.backfilled,
        planned.resend,
        tuple(planned.events),
        envelopes,
    )


def _summarise(
    spec: WorkloadSpec, rooms: list[_RoomResult], requests: list[BenchRequest]
) -> WorkloadSummary:
    events = [e for room in rooms for e in room.events]
    sizes = [len(e.pdu_json) for e in events]
    largest_room = max((len(room.events) for room in rooms), default=0)
    return WorkloadSummary(
        rooms_active=len(rooms),
        events_unique=len(events),
        events_sent=sum(len(r.events) for r in requests),
        requests=len(requests),
        backfill_requests=sum(r.backfilled for r in requests),
        resend_requests=sum(r.resend for r in requests),
        state_events=sum(e.state_key is not None for e in events),
        big_events=sum(size > BIG_EVENT_BYTES // 2 for size in sizes),
        forks=sum(room.forks for room in rooms),
        merges=sum(room.merges for room in rooms),
        mean_event_bytes=sum(sizes) / len(sizes) if sizes else 0.0,
        max_event_bytes=max(sizes, default=0),
        top_room_share=largest_room / len(events) if events else 0.0,
        room_versions=dict(Counter(room.room_version for room in rooms)),
    )
