"""The bare baseline: the same rows written into the same tables with nothing
but psycopg, so the persister's throughput can be read as a ratio of it.

For every batch the script writes what the persister's transaction writes
for new, linear events: `rooms` (new rooms only), `events`, `event_json`,
`event_edges`, `event_auth`, and the forward-extremity change (delete the
prevs the batch references, insert the events no later event of the batch
references). It commits once per batch. Two methods are measured:

- COPY: one `COPY ... FROM STDIN` per table (each a round trip);
- UNNEST: one `INSERT ... SELECT FROM unnest(arrays)` per table, pipelined,
  so a batch is a single round trip, as in the persister.

It is "bare" on purpose: rows are built before the clock starts, stream
orderings come from a local counter instead of the shared sequence, and
nothing is read back. "The ceiling" is the better of the two methods at
batches of 1000; the persister cannot beat it on the same machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg

from persister.bench.workload import GenEvent

INSTANCE = "ceiling"
BATCH_SIZES = (1000, 100, 1)
METHODS = ("copy", "unnest")

TABLES = (
    "rooms",
    "events",
    "event_json",
    "event_edges",
    "event_auth",
    "event_forward_extremities",
    "event_backward_extremities",
)

COPY_ROOMS = "COPY rooms (room_id, room_version) FROM STDIN"
COPY_EVENTS = """
COPY events (stream_ordering, topological_ordering, event_id, room_id, type, state_key,
             sender, origin_server_ts, received_ts, outlier, rejection_reason, instance_name)
FROM STDIN
"""
COPY_EVENT_JSON = "COPY event_json (event_id, room_id, json, room_version) FROM STDIN"
COPY_EDGES = "COPY event_edges (event_id, prev_event_id, room_id) FROM STDIN"
COPY_AUTH = "COPY event_auth (event_id, auth_id, room_id) FROM STDIN"
COPY_FORWARD = "COPY event_forward_extremities (room_id, event_id) FROM STDIN"

INSERT_ROOMS = """
INSERT INTO rooms (room_id, room_version) SELECT * FROM unnest(%b::text[], %b::text[])
"""
INSERT_EVENTS = """
INSERT INTO events (stream_ordering, topological_ordering, event_id, room_id, type, state_key,
                    sender, origin_server_ts, received_ts, outlier, rejection_reason,
                    instance_name)
SELECT * FROM unnest(%b::bigint[], %b::bigint[], %b::text[], %b::text[], %b::text[],
                     %b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::bool[],
                     %b::text[], %b::text[])
"""
INSERT_EVENT_JSON = """
INSERT INTO event_json (event_id, room_id, json, room_version)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[])
"""
INSERT_EDGES = """
INSERT INTO event_edges (event_id, prev_event_id, room_id)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[])
"""
INSERT_AUTH = """
INSERT INTO event_auth (event_id, auth_id, room_id)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[])
"""
INSERT_FORWARD = """
INSERT INTO event_forward_extremities (room_id, event_id)
SELECT * FROM unnest(%b::text[], %b::text[])
"""
# Both methods delete the same way: COPY cannot delete.
DELETE_FORWARD = """
DELETE FROM event_forward_extremities AS f USING unnest(%b::text[], %b::text[]) AS u(r, e)
WHERE f.room_id = u.r AND f.event_id = u.e
"""


class CeilingResult(msgspec.Struct, frozen=True):
    method: str
    batch: int
    events: int
    seconds: float
    events_per_s: float


class CeilingReport(msgspec.Struct, frozen=True):
    results: list[CeilingResult]
    # The better of COPY and UNNEST at the largest batch size.
    ceiling_events_per_s: float
    ceiling_method: str


@dataclass(frozen=True)
class CeilingRow:
    event: GenEvent
    room_version: str
    backfilled: bool


@dataclass
class BatchRows:
    """One batch's rows per table, built before timing starts."""

    events: int
    rooms: list[tuple[str, str]]
    event_rows: list[tuple[Any, ...]]
    json_rows: list[tuple[str, str, str, str]]
    edges: list[tuple[str, str, str]]
    auth: list[tuple[str, str, str]]
    forward_removed: list[tuple[str, str]]
    forward_added: list[tuple[str, str]]


Writer = Callable[[psycopg.Connection[Any], BatchRows], None]


def prepare_batches(rows: Sequence[CeilingRow], batch: int) -> list[BatchRows]:
    """Cut `rows` into batches and give them orderings, as a writer would."""
    now_ms = int(time.time() * 1000)
    seen_rooms: set[str] = set()
    counters = {False: 0, True: 0}
    batches = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        batches.append(_batch_rows(chunk, now_ms, seen_rooms, counters))
    return batches


def _batch_rows(
    chunk: Sequence[CeilingRow], now_ms: int, seen_rooms: set[str], counters: dict[bool, int]
) -> BatchRows:
    out = BatchRows(len(chunk), [], [], [], [], [], [], [])
    referenced: set[str] = set()
    for row in chunk:
        e = row.event
        if e.room_id not in seen_rooms:
            seen_rooms.add(e.room_id)
            out.rooms.append((e.room_id, row.room_version))
        counters[row.backfilled] += 1
        ordering = -counters[True] if row.backfilled else counters[False]
        out.event_rows.append(
            (
                ordering,
                e.depth,
                e.event_id,
                e.room_id,
                e.type,
                e.state_key,
                e.sender,
                e.origin_server_ts,
                now_ms,
                False,
                None,
                INSTANCE,
            )
        )
        out.json_rows.append((e.event_id, e.room_id, e.pdu_json.decode(), row.room_version))
        out.edges.extend((e.event_id, p, e.room_id) for p in e.prev_event_ids)
        out.auth.extend((e.event_id, a, e.room_id) for a in e.auth_event_ids)
        if not row.backfilled:
            referenced.update(e.prev_event_ids)
            out.forward_removed.extend((e.room_id, p) for p in e.prev_event_ids)
    out.forward_added = [
        (r.event.room_id, r.event.event_id)
        for r in chunk
        if not r.backfilled and r.event.event_id not in referenced
    ]
    return out


def write_copy(conn: psycopg.Connection[Any], rows: BatchRows) -> None:
    with conn.cursor() as cur:
        _copy(cur, COPY_ROOMS, rows.rooms)
        _copy(cur, COPY_EVENTS, rows.event_rows)
        _copy(cur, COPY_EVENT_JSON, rows.json_rows)
        _copy(cur, COPY_EDGES, rows.edges)
        _copy(cur, COPY_AUTH, rows.auth)
        if rows.forward_removed:
            cur.execute(DELETE_FORWARD, columns(rows.forward_removed, 2))
        _copy(cur, COPY_FORWARD, rows.forward_added)
    conn.commit()


def _copy(cur: psycopg.Cursor[Any], statement: str, rows: Sequence[tuple[Any, ...]]) -> None:
    if not rows:
        return
    with cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def write_unnest(conn: psycopg.Connection[Any], rows: BatchRows) -> None:
    with conn.pipeline(), conn.cursor() as cur:
        for statement, table, width in (
            (INSERT_ROOMS, rows.rooms, 2),
            (INSERT_EVENTS, rows.event_rows, 12),
            (INSERT_EVENT_JSON, rows.json_rows, 4),
            (INSERT_EDGES, rows.edges, 3),
            (INSERT_AUTH, rows.auth, 3),
            (DELETE_FORWARD, rows.forward_removed, 2),
            (INSERT_FORWARD, rows.forward_added, 2),
        ):
            if table:
                cur.execute(statement, columns(table, width))
        conn.commit()


WRITERS: dict[str, Writer] = {"copy": write_copy, "unnest": write_unnest}


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    """Rows to one list per column, the shape `unnest` takes."""
    if not rows:
        return tuple([] for _ in range(width))
    return tuple(list(column) for column in zip(*rows, strict=True))


def truncate(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    conn.commit()


def run_pass(
    conn: psycopg.Connection[Any], method: str, batches: Sequence[BatchRows], max_seconds: float
) -> CeilingResult:
    """Write batches in order until they run out or the time is up."""
    truncate(conn)
    write = WRITERS[method]
    events = 0
    started = time.perf_counter()
    deadline = started + max_seconds
    for rows in batches:
        write(conn, rows)
        events += rows.events
        if time.perf_counter() >= deadline:
            break
    seconds = time.perf_counter() - started
    return CeilingResult(
        method,
        len(batches[0].event_rows) if batches else 0,
        events,
        seconds,
        events / seconds if seconds > 0 else 0.0,
    )


def run_ceiling(
    database_url: str,
    rows: Sequence[CeilingRow],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    methods: Sequence[str] = METHODS,
    max_seconds: float = 5.0,
) -> CeilingReport:
    """Every method at every batch size, each pass on empty tables.

    The passes at the largest batch size write every row, whatever
    `max_seconds` says: the ceiling is taken from them, and it must see the
    tables grow as large as the run makes them, for the cost of a row grows
    with its indexes (once they outgrow shared_buffers, several-fold).
    """
    results = []
    top_batch = max(batch_sizes)
    with psycopg.connect(database_url, application_name="persister-bench:ceiling") as conn:
        for batch in batch_sizes:
            batches = prepare_batches(rows, batch)
            cap = math.inf if batch == top_batch else max_seconds
            for method in methods:
                result = run_pass(conn, method, batches, cap)
                results.append(msgspec.structs.replace(result, batch=batch))
        truncate(conn)
    return _report(results, top_batch)


def _report(results: list[CeilingResult], top_batch: int) -> CeilingReport:
    at_top = [r for r in results if r.batch == top_batch]
    best = max(at_top, key=lambda r: r.events_per_s)
    return CeilingReport(results, best.events_per_s, best.method)
