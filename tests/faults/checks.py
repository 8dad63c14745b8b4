"""After a fault run: what the database holds, an independent model of what
it should hold, and the checks that compare them with what was
acknowledged and announced. Each check returns a list of problems (empty
when it holds), so a test can report every broken promise at once.

The DAG model is written from contract section 4 and the README's
decisions, not from `persister/dag.py`:

- edges: every stored non-rejected event to each of its prev_events;
- backward extremities of a room: prevs of its stored non-outlier,
  non-rejected events that are not stored as non-outliers;
- forward extremities of a room: its forward (stream_ordering > 0)
  non-outlier, non-rejected events that no other such event lists as a
  prev. Backfilled events change no forward extremity, but one that a
  stored backfilled event lists leaves with the room's next forward event
  (the contract's formula, Synapse's `_calculate_new_extremities`). So an
  event listed only by backfilled ones may still be an extremity, if no
  forward event came after them; the model accepts it either way. This
  final-state form is exact as long as no backfilled event lists a forward
  event that arrives after it, which the harness's workload guarantees (a
  backfilled event's prevs are older history or the room's setup events,
  and the setup request is acknowledged before anything else of the room is
  sent).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg

from persister.bench.workload import BenchRequest
from persister.replication.messages import EventRow, RData
from tests.faults.load import Ledger
from tests.faults.watchers import Heard, Sample

SHOWN = 5  # problems of one kind quoted in full; the rest are counted

SELECT_EVENTS = """
SELECT e.event_id, e.room_id, e.stream_ordering, e.outlier, e.rejection_reason IS NOT NULL,
       e.instance_name, e.type, e.state_key, e.sender, j.json
FROM events e LEFT JOIN event_json j USING (event_id)
"""
SELECT_COMMIT_TIMES = """
SELECT stream_ordering, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8
FROM events WHERE stream_ordering > 0
"""


class _Pdu(msgspec.Struct):
    prev_events: list[Any] = []
    auth_events: list[Any] = []


_pdu = msgspec.json.Decoder(_Pdu)


def _ids(refs: list[Any]) -> tuple[str, ...]:
    # Room versions 1 and 2 list [event_id, hashes] pairs; later ones bare IDs.
    return tuple(ref[0] if isinstance(ref, list) else ref for ref in refs)


@dataclass(frozen=True)
class StoredEvent:
    event_id: str
    room_id: str
    ordering: int
    outlier: bool
    rejected: bool
    instance: str
    type: str
    state_key: str | None
    sender: str
    prevs: tuple[str, ...]
    auth: tuple[str, ...]
    has_json: bool

    def row(self) -> EventRow:
        return EventRow(
            self.ordering, self.event_id, self.room_id, self.type, self.state_key, self.sender
        )


@dataclass
class Stored:
    events: dict[str, StoredEvent]
    event_rows: int  # rows in `events`; more than len(events) would be a duplicate
    edges: set[tuple[str, str]]
    auth_rows: int
    forward: set[tuple[str, str]]
    backward: set[tuple[str, str]]
    positions: dict[str, int]
    # ordering -> commit time (wall clock), if the server tracks commit timestamps
    commit_times: dict[int, float] | None
    by_instance: dict[str, list[StoredEvent]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for event in sorted(self.events.values(), key=lambda e: e.ordering):
            if event.ordering > 0:
                self.by_instance.setdefault(event.instance, []).append(event)

    def forward_rows(self) -> list[EventRow]:
        return sorted(
            (e.row() for e in self.events.values() if e.ordering > 0),
            key=lambda r: r.stream_ordering,
        )

    def max_ordering(self) -> int:
        return max((e.ordering for e in self.events.values()), default=0)


async def load_stored(database_url: str) -> Stored:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        events: dict[str, StoredEvent] = {}
        rows = 0
        for eid, room, so, outlier, rejected, inst, typ, skey, sender, js in await (
            await conn.execute(SELECT_EVENTS)
        ).fetchall():
            rows += 1
            pdu = _pdu.decode(js) if js is not None else _Pdu()
            events[eid] = StoredEvent(
                eid, room, so, outlier, rejected, inst, typ, skey, sender,
                _ids(pdu.prev_events), _ids(pdu.auth_events), js is not None,
            )  # fmt: skip
        edges = await _pairs(conn, "SELECT event_id, prev_event_id FROM event_edges")
        forward = await _pairs(conn, "SELECT room_id, event_id FROM event_forward_extremities")
        backward = await _pairs(conn, "SELECT room_id, event_id FROM event_backward_extremities")
        auth_rows = (await (await conn.execute("SELECT count(*) FROM event_auth")).fetchall())[0][0]
        positions: dict[str, int] = dict(
            await (
                await conn.execute(
                    "SELECT instance_name, stream_id FROM stream_positions "
                    "WHERE stream_name = 'events'"
                )
            ).fetchall()
        )
        tracked = (await (await conn.execute("SHOW track_commit_timestamp")).fetchall())[0][0]
        commit_times: dict[int, float] | None = None
        if tracked == "on":
            commit_times = dict(await (await conn.execute(SELECT_COMMIT_TIMES)).fetchall())
    return Stored(events, rows, edges, auth_rows, forward, backward, positions, commit_times)


async def _pairs(conn: psycopg.AsyncConnection[Any], query: str) -> set[tuple[str, str]]:
    return {(a, b) for a, b in await (await conn.execute(query)).fetchall()}


# -- the DAG model ------------------------------------------------------------------


@dataclass
class DagModel:
    edges: set[tuple[str, str]]
    forward: set[tuple[str, str]]
    # Extremities or not, depending on what came after the backfill listing them.
    forward_maybe: set[tuple[str, str]]
    backward: set[tuple[str, str]]


def dag_model(events: Iterable[StoredEvent]) -> DagModel:
    events = list(events)
    linked = [e for e in events if not e.outlier and not e.rejected]
    stored_timeline = {e.event_id for e in events if not e.outlier}
    forward_events = [e for e in linked if e.ordering > 0]
    listed_by_forward = {p for e in forward_events for p in e.prevs}
    listed_by_backfill = {p for e in linked if e.ordering < 0 for p in e.prevs}
    heads = [e for e in forward_events if e.event_id not in listed_by_forward]
    return DagModel(
        edges={(e.event_id, p) for e in events if not e.rejected for p in e.prevs},
        forward={(e.room_id, e.event_id) for e in heads if e.event_id not in listed_by_backfill},
        forward_maybe={(e.room_id, e.event_id) for e in heads if e.event_id in listed_by_backfill},
        backward={(e.room_id, p) for e in linked for p in e.prevs if p not in stored_timeline},
    )  # fmt: skip


def check_dag(stored: Stored) -> list[str]:
    model = dag_model(stored.events.values())
    problems: list[str] = []
    for name, actual, expected in (
        ("event_edges", stored.edges, model.edges),
        ("event_forward_extremities", stored.forward - model.forward_maybe, model.forward),
        ("event_backward_extremities", stored.backward, model.backward),
    ):
        problems += _set_difference(name, actual, expected)
    expected_auth = sum(len(e.auth) for e in stored.events.values())
    if stored.auth_rows != expected_auth:
        problems.append(f"event_auth has {stored.auth_rows} rows, the PDUs list {expected_auth}")
    return problems


def check_workload_fits_model(requests: Sequence[BenchRequest]) -> list[str]:
    """The model's one assumption about arrival order (module docstring)."""
    setup: set[str] = set()
    seen_rooms: set[str] = set()
    history: set[str] = set()
    for r in requests:
        if r.room_id not in seen_rooms:
            seen_rooms.add(r.room_id)
            setup.update(e.event_id for e in r.events)
        if r.backfilled:
            history.update(e.event_id for e in r.events)
    problems = []
    for r in requests:
        if r.backfilled:
            for e in r.events:
                stray = set(e.prev_event_ids) - setup - history
                if stray:
                    problems.append(f"backfilled {e.event_id} lists forward events {stray}")
    return problems[:SHOWN]


def _set_difference(name: str, actual: set[Any], expected: set[Any]) -> list[str]:
    problems = []
    if missing := expected - actual:
        problems.append(f"{name}: {len(missing)} rows missing, e.g. {sorted(missing)[:SHOWN]}")
    if extra := actual - expected:
        problems.append(f"{name}: {len(extra)} rows the model lacks, e.g. {sorted(extra)[:SHOWN]}")
    return problems


# -- acknowledged events --------------------------------------------------------------


@dataclass
class Tally:
    acknowledged: int
    lost: int
    duplicated: int
    problems: list[str]


def check_acknowledged(ledger: Ledger, stored: Stored, requests: Sequence[BenchRequest]) -> Tally:
    """Every acknowledged event stored exactly once, with the ordering it was
    acknowledged with; nothing stored that was never sent; every request
    stored all-or-nothing."""
    problems: list[str] = []
    lost = sorted(ledger.acknowledged - set(stored.events))
    if lost:
        problems.append(f"{len(lost)} acknowledged events are not stored, e.g. {lost[:SHOWN]}")
    # event_id is UNIQUE, so a second copy would have to be a second row
    # (rows > events) or a second "new" answer for one event.
    twice = [eid for eid, rs in ledger.results.items() if sum(not r.duplicate for r in rs) > 1]
    duplicated = len(twice) + (stored.event_rows - len(stored.events))
    if duplicated:
        problems.append(f"{duplicated} events stored twice, e.g. {twice[:SHOWN]}")
    wrong = [
        (eid, r.stream_ordering, stored.events[eid].ordering)
        for eid, rs in ledger.results.items() if eid in stored.events
        for r in rs if r.stream_ordering != stored.events[eid].ordering
    ]  # fmt: skip
    if wrong:
        problems.append(f"{len(wrong)} answers name another ordering than stored: {wrong[:SHOWN]}")
    if unsent := set(stored.events) - ledger.sent_events:
        problems.append(f"{len(unsent)} stored events were never sent: {sorted(unsent)[:SHOWN]}")
    if no_json := [e.event_id for e in stored.events.values() if not e.has_json]:
        problems.append(f"{len(no_json)} events without event_json: {no_json[:SHOWN]}")
    problems += check_all_or_nothing(stored, requests)
    return Tally(len(ledger.acknowledged), len(lost), duplicated, problems)


def check_all_or_nothing(stored: Stored, requests: Sequence[BenchRequest]) -> list[str]:
    half = []
    for r in requests:
        if r.resend:
            continue
        present = sum(e.event_id in stored.events for e in r.events)
        if 0 < present < len(r.events):
            half.append(f"request {r.seq}: {present} of {len(r.events)} events stored")
    return [f"{len(half)} requests half-written: {half[:SHOWN]}"] if half else []


# -- the stream promise ----------------------------------------------------------------


@dataclass
class PromiseReport:
    announcements: int
    violations: int
    problems: list[str]


def check_announcements(heard: Sequence[Heard], stored: Stored) -> PromiseReport:
    """For every announcement (W, prev, pos) heard at time t:

    - no event of W with 0 < ordering <= pos committed after t (needs the
      server's commit timestamps; otherwise `check_samples` is the check);
    - its rows are exactly W's events with prev < ordering <= pos (the
      message promise of `persister.replication.messages`).
    """
    late: list[str] = []
    incomplete: list[str] = []
    for instance, events in stored.by_instance.items():
        orderings = [e.ordering for e in events]
        latest = _running_max_commit(events, stored.commit_times)
        for h in heard:
            c = h.command
            if c.instance != instance:
                continue
            upto = bisect.bisect_right(orderings, c.pos)
            if latest is not None and upto and latest[upto - 1] > h.at:
                late.append(
                    f"{instance} announced {c.pos} at {h.at:.6f}; an event <= it committed "
                    f"at {latest[upto - 1]:.6f}"
                )
            prev = c.pos if c.prev is None else c.prev
            if prev < c.pos:
                since = bisect.bisect_right(orderings, prev)
                expected = [e.row() for e in events[since:upto]]
                got = list(c.rows) if isinstance(c, RData) else []
                if got != expected:
                    incomplete.append(
                        f"{type(c).__name__} {instance} ({prev}, {c.pos}] carried "
                        f"{[r.stream_ordering for r in got][:10]}, stored "
                        f"{[r.stream_ordering for r in expected][:10]}"
                    )
    # Messages about instances that never stored anything: rows must be empty.
    for h in heard:
        if h.command.instance not in stored.by_instance and isinstance(h.command, RData):
            if h.command.rows:
                incomplete.append(f"RDATA for {h.command.instance} with rows nobody stored")
    problems = []
    if late:
        problems.append(f"{len(late)} announcements ahead of a commit: {late[:SHOWN]}")
    if incomplete:
        problems.append(f"{len(incomplete)} messages with wrong rows: {incomplete[:SHOWN]}")
    return PromiseReport(len(heard), len(late) + len(incomplete), problems)


def _running_max_commit(
    events: list[StoredEvent], commit_times: dict[int, float] | None
) -> list[float] | None:
    if commit_times is None:
        return None
    out, latest = [], float("-inf")
    for e in events:
        latest = max(latest, commit_times.get(e.ordering) or float("-inf"))
        out.append(latest)
    return out


def check_samples(samples: Sequence[Sample], stored: Stored) -> list[str]:
    """A reader's complete_up_to C, sampled with the count of events <= C
    committed then: that count never grows later. One problem per sample."""
    orderings = sorted(e.ordering for e in stored.events.values() if e.ordering > 0)
    grown = []
    for s in samples:
        now = bisect.bisect_right(orderings, s.complete_up_to)
        if now != s.committed_upto:
            grown.append(
                f"the stream grew below C={s.complete_up_to} after {s.at:.3f}: "
                f"{s.committed_upto} events committed then, {now} now"
            )
    return grown


def check_reader_rows(rows: Sequence[EventRow], stored: Stored, delivered_upto: int) -> list[str]:
    """The reader handed out every committed event up to where it got, once,
    in order, with the stored columns."""
    problems = []
    orderings = [r.stream_ordering for r in rows]
    if repeated := [o for o, n in Counter(orderings).items() if n > 1]:
        problems.append(f"reader delivered {len(repeated)} rows twice: {repeated[:SHOWN]}")
    if any(b <= a for a, b in zip(orderings, orderings[1:], strict=False)):
        problems.append("reader delivered rows out of order")
    expected = [r for r in stored.forward_rows() if r.stream_ordering <= delivered_upto]
    delivered = {r.stream_ordering: r for r in rows}
    if missed := [r.stream_ordering for r in expected if r.stream_ordering not in delivered]:
        problems.append(f"reader missed {len(missed)} rows, e.g. {missed[:SHOWN]}")
    if wrong := [r.stream_ordering for r in expected if delivered.get(r.stream_ordering, r) != r]:
        problems.append(f"reader rows differ from the stored ones: {wrong[:SHOWN]}")
    if phantom := sorted(set(delivered) - {r.stream_ordering for r in stored.forward_rows()}):
        problems.append(f"reader delivered rows nobody stored: {phantom[:SHOWN]}")
    return problems


@dataclass(frozen=True)
class Published:
    """One line of a hooked persister's publish log."""

    pid: int
    own: str
    instance: str
    prev: int | None
    pos: int
    rows: int
    t: float


def check_recovery(
    published: Sequence[Published],
    heard: Sequence[Heard],
    starts: dict[str, list[tuple[int, float]]],
) -> list[str]:
    """Positions after restarts: each process's own announcements never go
    down, and an instance's next incarnation starts at or above everything
    announced for that instance (by itself or a deputy) before it started.

    `starts`: instance -> [(pid, wall time it was spawned)], in order."""
    problems = []
    by_pid: dict[int, list[Published]] = {}
    for p in published:
        if p.instance == p.own:
            by_pid.setdefault(p.pid, []).append(p)
    for pid, own in by_pid.items():
        positions = [p.pos for p in own]
        if any(b < a for a, b in zip(positions, positions[1:], strict=False)):
            problems.append(f"process {pid} ({own[0].own}) announced a lower position later")
    for instance, incarnations in starts.items():
        for pid, started in incarnations[1:]:
            first = by_pid.get(pid)
            if not first:
                continue  # killed before its first announcement
            before = [h.command.pos for h in heard if h.command.instance == instance
                      and h.at < started]  # fmt: skip
            if before and first[0].pos < max(before):
                problems.append(
                    f"{instance} restarted (pid {pid}) at {first[0].pos}, below {max(before)} "
                    "announced before it started"
                )
    return problems


# -- all of the above -------------------------------------------------------------------


@dataclass
class Verdict:
    """The figures every fault test reports, and every problem found."""

    events_acknowledged: int = 0
    requests_acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    # Events whose first answer never arrived (committed, then the answer was
    # lost to a kill or an outage): every answer they got says duplicate.
    answers_lost: int = 0
    announcements: int = 0
    promise_violations: int = 0
    reader_samples: int = 0
    reader_rows: int = 0
    commit_timestamps: bool = False
    problems: list[str] = field(default_factory=list)


def judge(
    ledger: Ledger,
    requests: Sequence[BenchRequest],
    stored: Stored,
    heard: Sequence[Heard],
    reader: tuple[Sequence[EventRow], Sequence[Sample], int] | None,
) -> Verdict:
    """Every check above; `reader`: its rows, its samples, how far it delivered."""
    v = Verdict(requests_acknowledged=ledger.requests_ok)
    if ledger.failures:
        v.problems.append(
            f"{len(ledger.failures)} requests never acknowledged: {ledger.failures[:SHOWN]}"
        )
    tally = check_acknowledged(ledger, stored, requests)
    v.events_acknowledged, v.lost, v.duplicated = tally.acknowledged, tally.lost, tally.duplicated
    v.answers_lost = ledger.new_answers_per_event()[0]
    v.problems += tally.problems
    v.problems += check_workload_fits_model(requests)
    v.problems += check_dag(stored)
    promise = check_announcements(heard, stored)
    v.announcements, v.promise_violations = promise.announcements, promise.violations
    v.commit_timestamps = stored.commit_times is not None
    v.problems += promise.problems
    if reader is not None:
        rows, samples, delivered = reader
        grown = check_samples(samples, stored)
        v.promise_violations += len(grown)
        if grown:
            v.problems.append(f"{len(grown)} reader samples broken: {grown[:SHOWN]}")
        v.problems += check_reader_rows(rows, stored, delivered)
        v.reader_samples, v.reader_rows = len(samples), len(rows)
    return v
