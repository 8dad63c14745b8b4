"""Reading and writing the room DAG tables inside one write transaction.

Every function here runs inside a transaction the writer opened (`_txn`
suffix, cursor first). Loads are pipelined so a batch costs one round trip
to read what the DAG rules need; writes are one statement per table over
arrays (`unnest`), whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncCursor

from persister.dag import BatchPlan, StoredEvent, StoredView
from persister.matrix.prepared import PreparedEvent

Cursor = AsyncCursor[Any]

SELECT_STORED_EVENTS = """
SELECT event_id, room_id, outlier, rejection_reason IS NOT NULL, stream_ordering,
       topological_ordering
FROM events WHERE event_id = ANY(%b)
"""
SELECT_ROOM_VERSIONS = "SELECT room_id, room_version FROM rooms WHERE room_id = ANY(%b)"
SELECT_FORWARD_EXTREMITIES = """
SELECT room_id, event_id FROM event_forward_extremities WHERE room_id = ANY(%b)
"""
SELECT_BACKWARD_EXTREMITIES = """
SELECT room_id, event_id FROM event_backward_extremities WHERE event_id = ANY(%b)
"""

ALLOCATE_FORWARD = "SELECT nextval('events_stream_seq') FROM generate_series(1, %s)"
ALLOCATE_BACKFILL = "SELECT -nextval('events_backfill_stream_seq') FROM generate_series(1, %s)"

INSERT_EVENTS = """
INSERT INTO events (stream_ordering, topological_ordering, event_id, room_id, type, state_key,
                    sender, origin_server_ts, received_ts, outlier, rejection_reason,
                    instance_name)
SELECT o, d, e, r, t, s, snd, ts, %s, ol, rr, %s
FROM unnest(%b::bigint[], %b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[],
            %b::text[], %b::bigint[], %b::bool[], %b::text[])
     AS u(o, d, e, r, t, s, snd, ts, ol, rr)
"""
INSERT_EVENT_JSON = """
INSERT INTO event_json (event_id, room_id, json, room_version)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[])
"""
INSERT_EDGES = """
INSERT INTO event_edges (event_id, prev_event_id, room_id)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[])
ON CONFLICT DO NOTHING
"""
INSERT_AUTH = """
INSERT INTO event_auth (event_id, auth_id, room_id)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[])
"""
INSERT_REJECTIONS = """
INSERT INTO rejections (event_id, reason, last_check)
SELECT e, r, %s FROM unnest(%b::text[], %b::text[]) AS u(e, r)
"""
INSERT_ROOMS = """
INSERT INTO rooms (room_id, room_version)
SELECT * FROM unnest(%b::text[], %b::text[]) ON CONFLICT DO NOTHING
"""
DEOUTLIER = "UPDATE events SET outlier = FALSE WHERE event_id = ANY(%b)"
DELETE_FORWARD = """
DELETE FROM event_forward_extremities AS f USING unnest(%b::text[], %b::text[]) AS u(r, e)
WHERE f.room_id = u.r AND f.event_id = u.e
"""
INSERT_FORWARD = """
INSERT INTO event_forward_extremities (room_id, event_id)
SELECT * FROM unnest(%b::text[], %b::text[]) ON CONFLICT DO NOTHING
"""
DELETE_BACKWARD = """
DELETE FROM event_backward_extremities AS b USING unnest(%b::text[], %b::text[]) AS u(r, e)
WHERE b.room_id = u.r AND b.event_id = u.e
"""
INSERT_BACKWARD = """
INSERT INTO event_backward_extremities (room_id, event_id)
SELECT * FROM unnest(%b::text[], %b::text[]) ON CONFLICT DO NOTHING
"""


async def load_view_txn(
    cur: Cursor, room_ids: Sequence[str], event_ids: Sequence[str], prev_ids: Sequence[str]
) -> StoredView:
    """Everything `dag.link_batch` needs, read in one pipelined round trip."""
    known_ids = list({*event_ids, *prev_ids})
    conn = cur.connection
    async with conn.pipeline():
        c_events = await conn.execute(SELECT_STORED_EVENTS, (known_ids,))
        c_rooms = await conn.execute(SELECT_ROOM_VERSIONS, (list(room_ids),))
        c_forward = await conn.execute(SELECT_FORWARD_EXTREMITIES, (list(room_ids),))
        c_backward = await conn.execute(SELECT_BACKWARD_EXTREMITIES, (known_ids,))
    events = {
        row[0]: StoredEvent(row[1], row[2], row[3], row[4], row[5])
        for row in await c_events.fetchall()
    }
    forward: dict[str, set[str]] = {}
    for room_id, event_id in await c_forward.fetchall():
        forward.setdefault(room_id, set()).add(event_id)
    backward = {(r, e) for r, e in await c_backward.fetchall()}
    return StoredView(
        events=events,
        room_versions=dict(await c_rooms.fetchall()),
        forward_extremities=forward,
        backward_extremities=backward,
        # A stored non-outlier, non-rejected event that lists a prev it
        # lacks (or has only as an outlier) made it a backward extremity, and
        # it stays one until it arrives as a non-outlier. So for the events
        # being linked, "listed as a prev by a stored event" is exactly
        # "is a backward extremity": no join over event_edges is needed.
        referenced={event_id for _, event_id in backward},
    )


async def allocate_orderings_txn(
    cur: Cursor, forward: int, backfill: int
) -> tuple[list[int], list[int]]:
    """Take orderings from the shared sequences; they are not transactional,
    so a rollback leaves a gap that the position tracker treats as finished."""
    forward_ids: list[int] = []
    backfill_ids: list[int] = []
    if forward:
        await cur.execute(ALLOCATE_FORWARD, (forward,))
        forward_ids = [row[0] for row in await cur.fetchall()]
    if backfill:
        await cur.execute(ALLOCATE_BACKFILL, (backfill,))
        backfill_ids = [row[0] for row in await cur.fetchall()]
    return forward_ids, backfill_ids


async def write_plan_txn(
    cur: Cursor,
    plan: BatchPlan,
    orderings: Sequence[int],
    room_versions: dict[str, str],
    instance: str,
    now_ms: int,
) -> None:
    """Write every row of a planned batch; `orderings` match `plan.new_events`."""
    conn = cur.connection
    async with conn.pipeline():
        if plan.new_rooms:
            await cur.execute(INSERT_ROOMS, _columns(plan.new_rooms.items(), 2))
        if plan.new_events:
            await _insert_events(cur, plan.new_events, orderings, room_versions, instance, now_ms)
        if plan.edges:
            await cur.execute(INSERT_EDGES, _columns(plan.edges, 3))
        if plan.auth:
            await cur.execute(INSERT_AUTH, _columns(plan.auth, 3))
        if plan.rejections:
            await cur.execute(INSERT_REJECTIONS, (now_ms, *_columns(plan.rejections, 2)))
        if plan.deoutliered:
            await cur.execute(DEOUTLIER, (plan.deoutliered,))
        await _write_extremities(cur, plan)


async def _insert_events(
    cur: Cursor,
    events: Sequence[PreparedEvent],
    orderings: Sequence[int],
    room_versions: dict[str, str],
    instance: str,
    now_ms: int,
) -> None:
    await cur.execute(
        INSERT_EVENTS,
        (
            now_ms,
            instance,
            list(orderings),
            [e.depth for e in events],
            [e.event_id for e in events],
            [e.room_id for e in events],
            [e.type for e in events],
            [e.state_key for e in events],
            [e.sender for e in events],
            [e.origin_server_ts for e in events],
            [e.outlier for e in events],
            [e.rejected_reason for e in events],
        ),
    )
    await cur.execute(
        INSERT_EVENT_JSON,
        (
            [e.event_id for e in events],
            [e.room_id for e in events],
            [e.json for e in events],
            [room_versions[e.room_id] for e in events],
        ),
    )


async def _write_extremities(cur: Cursor, plan: BatchPlan) -> None:
    if plan.forward_removed:
        await cur.execute(DELETE_FORWARD, _columns(plan.forward_removed, 2))
    if plan.forward_added:
        await cur.execute(INSERT_FORWARD, _columns(plan.forward_added, 2))
    if plan.backward_removed:
        await cur.execute(DELETE_BACKWARD, _columns(plan.backward_removed, 2))
    if plan.backward_added:
        await cur.execute(INSERT_BACKWARD, _columns(plan.backward_added, 2))


def _columns(rows: Any, width: int) -> tuple[list[Any], ...]:
    """Rows of tuples to one list per column, the shape `unnest` takes."""
    columns = tuple(list(column) for column in zip(*rows, strict=True))
    return columns if columns else tuple([] for _ in range(width))
