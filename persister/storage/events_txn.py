"""Reading and writing the room DAG tables inside one write transaction.

The writer decides when a transaction begins and ends; the statements that
do it live here with the rest of the SQL (`*_command` builds a statement
with its parameters, `*_txn` sends). A batch costs two round trips whatever
its size (`persister.storage.pipeline`): BEGIN, the fences, and one
statement that loads what linking needs and draws the orderings, together;
then one statement that writes every table (arrays through `unnest`, bound
in binary) with the COMMIT.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.pq.abc import PGresult

from persister.dag import BatchPlan, StoredEvent, StoredView
from persister.storage import pipeline
from persister.storage.arrays import BoolArray, Int8Array, TextArray
from persister.storage.pipeline import Command
from persister.storage.shard_map import Fenced, fenced_from_row

Connection = AsyncConnection[Any]

# Everything `dag.link_batch` needs, and the batch's orderings, in ONE
# statement: every statement of a pipeline costs a message exchange, a parse
# and a plan at the server and a send at the client, so five loads and two
# draws made seven. Each row says what it is in its first column (the LOAD_*
# kinds below); an Append runs its branches in order. `events` is probed by
# its unique index once per ID (OFFSET 0 keeps the planner from turning the
# probes into a hash join over a sequential scan, which it prefers for a few
# hundred IDs whatever the table's size when statistics are missing or
# stale: a scan of the whole table per batch). A forward extremity's row
# says whether a stored event lists it as a prev (only a backfilled one can,
# and the next event linked drops it, `persister.dag`): one probe of
# `event_edges_prev` per extremity, nearly always finding nothing (as an
# EXISTS, the lanes' plan walked all of `events` per extremity, and
# PostgreSQL's CPU per event went from 50 to 260 µs). Orderings come from
# the shared sequences, which are not transactional: a rollback leaves a
# gap that the position tracker treats as finished.
LOAD_BATCH = """
SELECT 0, e.*
FROM unnest(%(known)b::text[]) AS k(id),
     LATERAL (SELECT event_id, room_id, outlier, rejection_reason IS NOT NULL,
                     stream_ordering, topological_ordering
              FROM events WHERE event_id = k.id OFFSET 0) AS e
UNION ALL
SELECT 1, room_id, room_version, NULL, NULL, NULL, NULL
FROM rooms WHERE room_id = ANY(%(rooms)b::text[])
UNION ALL
SELECT 2, f.room_id, f.event_id, listed.yes IS NOT NULL, NULL, NULL, NULL
FROM event_forward_extremities AS f
LEFT JOIN LATERAL (
    SELECT true AS yes
    FROM (SELECT event_id FROM event_edges WHERE prev_event_id = f.event_id OFFSET 0) AS l,
         LATERAL (SELECT FROM events AS v WHERE v.event_id = l.event_id AND NOT v.outlier
                    AND v.rejection_reason IS NULL OFFSET 0) AS v
    LIMIT 1) AS listed ON true
WHERE f.room_id = ANY(%(rooms)b::text[])
UNION ALL
SELECT 3, room_id, event_id, NULL, NULL, NULL, NULL
FROM event_backward_extremities WHERE event_id = ANY(%(known)b::text[])
UNION ALL
SELECT 4, NULL, NULL, NULL, NULL, nextval('events_stream_seq'), NULL
FROM generate_series(1, %(forward)s::int)
UNION ALL
SELECT 5, NULL, NULL, NULL, NULL, -nextval('events_backfill_stream_seq'), NULL
FROM generate_series(1, %(backfill)s::int)
"""
LOAD_EVENT, LOAD_ROOM, LOAD_FORWARD, LOAD_BACKWARD, DRAWN_FORWARD, DRAWN_BACKFILL = range(6)

# The lane's connection is in autocommit mode, so psycopg never sends a BEGIN
# of its own (which would cost a round trip): these go in the pipelines.
BEGIN = pipeline.plain("BEGIN")
COMMIT = pipeline.plain("COMMIT")

# Every write of a batch in one statement: one round trip and one parse,
# whatever the batch holds (empty arrays insert nothing). Sub-statements of
# one statement cannot see each other's rows; the plan never deletes and
# inserts the same extremity, and de-outliers only events stored before.
# Each part writes one table's rows from the batch's arrays; its name is the
# CTE's.
_NEW_ROOMS = """
    INSERT INTO rooms (room_id, room_version)
    SELECT * FROM unnest(%(room_ids)b::text[], %(room_versions)b::text[])
    ON CONFLICT DO NOTHING"""
_NEW_EVENTS = """
    INSERT INTO events (stream_ordering, topological_ordering, event_id, room_id, type,
                        state_key, sender, origin_server_ts, received_ts, outlier,
                        rejection_reason, instance_name)
    SELECT o, d, e, r, t, s, snd, ts, %(now_ms)s::bigint, ol, rr, %(instance)s::text
    FROM unnest(%(orderings)b::bigint[], %(depths)b::bigint[], %(event_ids)b::text[],
                %(event_rooms)b::text[], %(types)b::text[], %(state_keys)b::text[],
                %(senders)b::text[], %(timestamps)b::bigint[], %(outliers)b::bool[],
                %(rejected)b::text[])
         AS u(o, d, e, r, t, s, snd, ts, ol, rr)"""
_NEW_JSON = """
    INSERT INTO event_json (event_id, room_id, json, room_version)
    SELECT * FROM unnest(%(event_ids)b::text[], %(event_rooms)b::text[], %(json)b::text[],
                         %(event_versions)b::text[])"""
# No ON CONFLICT (it made this the dearest insert of the batch, auto_explain:
# a speculative insertion per row): edges are written only for new events,
# with their `events` row, and their prevs are distinct, so a conflict could
# only come with a duplicate event ID, which `new_events` refuses anyway.
_NEW_EDGES = """
    INSERT INTO event_edges (event_id, prev_event_id, room_id)
    SELECT * FROM unnest(%(edge_events)b::text[], %(edge_prevs)b::text[],
                         %(edge_rooms)b::text[])"""
_NEW_AUTH = """
    INSERT INTO event_auth (event_id, auth_id, room_id)
    SELECT * FROM unnest(%(auth_events)b::text[], %(auth_ids)b::text[],
                         %(auth_rooms)b::text[])"""
_NEW_REJECTIONS = """
    INSERT INTO rejections (event_id, reason, last_check)
    SELECT e, r, %(now_ms)s::bigint FROM unnest(%(rejection_events)b::text[],
                                         %(rejection_reasons)b::text[]) AS u(e, r)"""
_DEOUTLIERED = """
    UPDATE events SET outlier = FALSE WHERE event_id = ANY(%(deoutliered)b::text[])"""
_GONE_FORWARD = """
    DELETE FROM event_forward_extremities AS f
    USING unnest(%(forward_gone_rooms)b::text[], %(forward_gone_events)b::text[]) AS u(r, e)
    WHERE f.room_id = u.r AND f.event_id = u.e"""
_NEW_FORWARD = """
    INSERT INTO event_forward_extremities (room_id, event_id)
    SELECT * FROM unnest(%(forward_new_rooms)b::text[], %(forward_new_events)b::text[])
    ON CONFLICT DO NOTHING"""
_GONE_BACKWARD = """
    DELETE FROM event_backward_extremities AS b
    USING unnest(%(backward_gone_rooms)b::text[], %(backward_gone_events)b::text[]) AS u(r, e)
    WHERE b.room_id = u.r AND b.event_id = u.e"""
_NEW_BACKWARD = """
    INSERT INTO event_backward_extremities (room_id, event_id)
    SELECT * FROM unnest(%(backward_new_rooms)b::text[], %(backward_new_events)b::text[])
    ON CONFLICT DO NOTHING"""
# In the same transaction as the events, and never backwards. The row is a
# promise, so a lower value is still true: when another lane of this writer
# holds it (its transaction has not ended), skip it rather than wait for that
# COMMIT, which made the lanes commit one after the other. The holder, the
# next batch or the heartbeat moves it on. The row exists from the writer's
# start (streams.recover_position).
_POSITION = """
    UPDATE stream_positions SET stream_id = %(position)s::bigint
    WHERE (stream_name, instance_name) IN (
        SELECT stream_name, instance_name FROM stream_positions
        WHERE stream_name = 'events' AND instance_name = %(instance)s::text
          AND stream_id < %(position)s::bigint
        FOR UPDATE SKIP LOCKED
    ) AND stream_id < %(position)s::bigint"""


def _with(parts: dict[str, str], result: str) -> str:
    ctes = ",\n".join(f"{name} AS ({sql}\n)" for name, sql in parts.items())
    return f"\nWITH\n{ctes}\n{result}\n"


WRITE_BATCH = _with(
    {
        "new_rooms": _NEW_ROOMS,
        "new_events": _NEW_EVENTS,
        "new_json": _NEW_JSON,
        "new_edges": _NEW_EDGES,
        "new_auth": _NEW_AUTH,
        "new_rejections": _NEW_REJECTIONS,
        "deoutliered": _DEOUTLIERED,
        "gone_forward": _GONE_FORWARD,
        "new_forward": _NEW_FORWARD,
        "gone_backward": _GONE_BACKWARD,
        "new_backward": _NEW_BACKWARD,
        "position": _POSITION,
    },
    "SELECT 1",
)

# A batch in one round trip (`persister.writer.lane`): its orderings are
# drawn in the same pipeline, after the fence (`DRAW`), and come back as soon
# as that statement ends, while the write still runs; the write takes them
# from the transaction's setting. Nothing was loaded, so the write checks
# what the lane remembered of its rooms (their forward extremities, exactly,
# and that no stored event lists a new one as a missing prev) and refuses the
# batch otherwise; a duplicate event breaks `events`' unique index. Such
# batches hold only new, accepted events of known rooms: no room, rejection,
# outlier or backward extremity to write.
DRAW = """
SELECT set_config('persister.orderings', array_agg(o ORDER BY o)::text, true)::bigint[]
FROM (SELECT nextval('events_stream_seq') FROM generate_series(1, %(count)s::int)) AS d(o)
"""
WRITE_REMEMBERED = _with(
    {
        "new_events": _NEW_EVENTS.replace(
            "%(orderings)b::bigint[]", "current_setting('persister.orderings')::bigint[]"
        ),
        "new_json": _NEW_JSON,
        "new_edges": _NEW_EDGES,
        "new_auth": _NEW_AUTH,
        "gone_forward": _GONE_FORWARD,
        "new_forward": _NEW_FORWARD,
        "position": _POSITION,
    },
    # The main query sees the tables as they were before the parts' writes.
    """SELECT persister_expect(
           (SELECT count(*) FROM event_forward_extremities WHERE room_id = ANY(%(rooms)b::text[]))
               = cardinality(%(remembered_rooms)b::text[])
           AND NOT EXISTS (
               SELECT 1 FROM event_forward_extremities
               WHERE room_id = ANY(%(rooms)b::text[])
                 AND (room_id, event_id) NOT IN (
                     SELECT * FROM unnest(%(remembered_rooms)b::text[],
                                          %(remembered_events)b::text[]))),
           'forward extremities')
       AND persister_expect(
           NOT EXISTS (SELECT 1 FROM event_backward_extremities
                       WHERE event_id = ANY(%(event_ids)b::text[])),
           'a new event is listed as a missing prev')""",
)

# Parse, analysis and planning of the big statements cost the server more
# than a small batch's rows (a third of a 10-event transaction's CPU, perf),
# so they are prepared once per connection and planned once: generic plans.
# BEGIN and COMMIT stay plain queries (tests/faults/pgproxy.py reads them off
# the wire).
#
# A generic plan lives as long as the connection, and one made while the
# tables were small would be a sequential scan or a hash join over one, which
# slows every batch as the tables grow. Every table a lane reads or writes is
# reached by a key it has an index on, so the lane's session turns those plan
# shapes off: whatever the statistics say, each access is an index probe,
# which is the right plan at every size (nested loops over a batch's few
# hundred keys). The fence functions' plpgsql plans follow the same settings.
#
# Bitmap scans go too, for a reason of their own: they never mark the index
# entries of dead rows as dead, and every event replaces its room's forward
# extremity. Until a vacuum, each batch's bitmap scan of a busy room's
# extremities walked every extremity the room ever had (18,260 index entries
# for 30 rooms, 3.3 ms, after 55,000 single events). A plain index scan marks
# them on its first pass and skips them after (0.24 ms for the same rooms).
LANE_PLAN_SETTINGS = """
SELECT set_config('plan_cache_mode', 'force_generic_plan', false),
       set_config('enable_seqscan', 'off', false),
       set_config('enable_hashjoin', 'off', false),
       set_config('enable_mergejoin', 'off', false),
       set_config('enable_bitmapscan', 'off', false)
"""

# Both fences (liveness and shard map), see migrations/0005_epoch_drain.sql.
FENCE = """
SELECT * FROM persister_fence(%(namespace)s::int, %(instance)s::text,
                              %(liveness_epoch)s::bigint, %(routed_epoch)s::bigint)
"""

LOAD_STATEMENT = pipeline.statement("persister_load_batch", LOAD_BATCH)
WRITE_STATEMENT = pipeline.statement("persister_write_batch", WRITE_BATCH)
FENCE_STATEMENT = pipeline.statement("persister_fence", FENCE)
ROUTED_FENCE_STATEMENT = pipeline.statement(
    "persister_fence_routed",
    FENCE.replace("SELECT * FROM persister_fence(", "SELECT persister_fence_routed("),
)
DRAW_STATEMENT = pipeline.statement("persister_draw", DRAW)
WRITE_REMEMBERED_STATEMENT = pipeline.statement("persister_write_remembered", WRITE_REMEMBERED)


PREPARED = (
    LOAD_STATEMENT,
    WRITE_STATEMENT,
    FENCE_STATEMENT,
    ROUTED_FENCE_STATEMENT,
    DRAW_STATEMENT,
    WRITE_REMEMBERED_STATEMENT,
)


async def prepare_connection(conn: Connection) -> None:
    """Make `conn` ready to run batches: prepared statements with plans that
    are index probes whatever the tables' size."""
    await conn.execute(LANE_PLAN_SETTINGS)
    await pipeline.prepare(conn, PREPARED)


def fence_command(namespace: int, instance: str, liveness_epoch: int, routed_epoch: int) -> Command:
    return pipeline.bind(
        FENCE_STATEMENT,
        {
            "namespace": namespace,
            "instance": instance,
            "liveness_epoch": liveness_epoch,
            "routed_epoch": routed_epoch,
        },
    )


def load_command(
    room_ids: Sequence[str],
    event_ids: Sequence[str],
    prev_ids: Sequence[str],
    draw: tuple[int, int],
) -> Command:
    """What `dag.link_batch` needs for these rooms and events, and `draw`
    orderings: as many forward and backfill ones as the batch could need."""
    params = {
        "known": TextArray({*event_ids, *prev_ids}),
        "rooms": TextArray(room_ids),
        "forward": draw[0],
        "backfill": draw[1],
    }
    return pipeline.bind(LOAD_STATEMENT, params)


async def begin_batch_txn(
    conn: Connection, fence: Command, load: Command
) -> tuple[Fenced, StoredView, list[int], list[int]]:
    """BEGIN, pass the fences, read everything `dag.link_batch` needs and
    draw orderings, all in one round trip.

    The plan is made only once the orderings are back (the caller finishes
    the ones it does not use). The server runs the pipeline in order and
    skips what follows an error, so no ordering is drawn unless both fences
    passed. Returns what the shard-map fence found, the view and the forward
    and backfill orderings.
    """
    _, fenced, loaded = await pipeline.round_trip(conn, (BEGIN, fence, load))
    (fence_row,) = pipeline.rows(conn, fenced)
    view, drawn = view_from_rows(pipeline.rows(conn, loaded))
    return fenced_from_row(fence_row), view, drawn[DRAWN_FORWARD], drawn[DRAWN_BACKFILL]


def view_from_rows(rows: list[tuple[Any, ...]]) -> tuple[StoredView, dict[int, list[int]]]:
    events: dict[str, StoredEvent] = {}
    room_versions: dict[str, str] = {}
    forward: dict[str, set[str]] = {}
    backward: set[tuple[str, str]] = set()
    referenced_forward: set[str] = set()
    drawn: dict[int, list[int]] = {DRAWN_FORWARD: [], DRAWN_BACKFILL: []}
    for kind, a, b, outlier, rejected, ordering, depth in rows:
        if kind == LOAD_EVENT:
            events[a] = StoredEvent(b, outlier, rejected, ordering, depth)
        elif kind == LOAD_ROOM:
            room_versions[a] = b
        elif kind == LOAD_FORWARD:
            forward.setdefault(a, set()).add(b)
            if outlier:  # the "listed by a stored event" flag, in this column
                referenced_forward.add(b)
        elif kind == LOAD_BACKWARD:
            backward.add((a, b))
        else:
            drawn[kind].append(ordering)
    view = StoredView(
        events=events,
        room_versions=room_versions,
        forward_extremities=forward,
        backward_extremities=backward,
        # A stored non-outlier, non-rejected event that lists a prev it
        # lacks (or has only as an outlier) made it a backward extremity, and
        # it stays one until it arrives as a non-outlier. So for the events
        # being linked, "listed as a prev by a stored event" is exactly
        # "is a backward extremity": no join over event_edges is needed.
        referenced={event_id for _, event_id in backward} | referenced_forward,
    )
    return view, drawn


async def commit_txn(conn: Connection, write: Command) -> None:
    """Send the batch's write and the COMMIT together: the second round trip."""
    await pipeline.round_trip(conn, (write, COMMIT))


def write_command(
    plan: BatchPlan,
    orderings: Sequence[int],
    room_versions: dict[str, str],
    instance: str,
    now_ms: int,
    position: int | None,
) -> Command:
    """The statement that writes every row of a planned batch; `orderings`
    match `plan.new_events`. `commit_txn` sends it.

    `position`, when given, is this writer's stream position once the batch
    commits, stored in the same transaction.
    """
    params = _write_params(plan, room_versions, instance, now_ms, position)
    params["orderings"] = Int8Array(orderings)
    return pipeline.bind(WRITE_STATEMENT, params)


def routed_fence_command(
    namespace: int, instance: str, liveness_epoch: int, routed_epoch: int
) -> Command:
    """Both fences, refusing unless `routed_epoch` is the shard map in force."""
    return pipeline.bind(
        ROUTED_FENCE_STATEMENT,
        {
            "namespace": namespace,
            "instance": instance,
            "liveness_epoch": liveness_epoch,
            "routed_epoch": routed_epoch,
        },
    )


def draw_command(count: int) -> Command:
    """`count` forward orderings for `write_remembered_command`'s events."""
    return pipeline.bind(DRAW_STATEMENT, {"count": count})


def drawn(conn: Connection, result: PGresult) -> list[int]:
    """The orderings `draw_command` drew, in the order the events take them."""
    ((orderings,),) = pipeline.rows(conn, result)
    return list(orderings)


def write_remembered_command(
    plan: BatchPlan,
    remembered_forward: Sequence[tuple[str, str]],
    room_versions: dict[str, str],
    instance: str,
    now_ms: int,
    position: int,
) -> Command:
    """The write of a batch planned from what the lane remembers of its rooms
    (only new, accepted events of known rooms), refused unless the rooms'
    forward extremities are `remembered_forward` (room, event) and no stored
    event lists a new one as a missing prev. Its orderings are
    `draw_command`'s. `position` is a position this writer already holds
    (the batch's own orderings are not known when it is sent)."""
    params = _write_params(plan, room_versions, instance, now_ms, position)
    params["rooms"] = TextArray(room_versions)
    _add_columns(params, ("remembered_rooms", "remembered_events"), remembered_forward)
    return pipeline.bind(WRITE_REMEMBERED_STATEMENT, params)


def _write_params(
    plan: BatchPlan, room_versions: dict[str, str], instance: str, now_ms: int, position: int | None
) -> dict[str, Any]:
    events = plan.new_events
    params: dict[str, Any] = {
        "instance": instance,
        "now_ms": now_ms,
        "position": position,
        "depths": Int8Array([e.depth for e in events]),
        "event_ids": TextArray([e.event_id for e in events]),
        "event_rooms": TextArray([e.room_id for e in events]),
        "types": TextArray([e.type for e in events]),
        "state_keys": TextArray([e.state_key for e in events]),
        "senders": TextArray([e.sender for e in events]),
        "timestamps": Int8Array([e.origin_server_ts for e in events]),
        "outliers": BoolArray([e.outlier for e in events]),
        "rejected": TextArray([e.rejected_reason for e in events]),
        "json": TextArray([e.json for e in events]),
        "event_versions": TextArray([room_versions[e.room_id] for e in events]),
        "deoutliered": TextArray(plan.deoutliered),
    }
    _add_columns(params, ("room_ids", "room_versions"), plan.new_rooms.items())
    _add_columns(params, ("edge_events", "edge_prevs", "edge_rooms"), plan.edges)
    _add_columns(params, ("auth_events", "auth_ids", "auth_rooms"), plan.auth)
    _add_columns(params, ("rejection_events", "rejection_reasons"), plan.rejections)
    _add_columns(params, ("forward_gone_rooms", "forward_gone_events"), plan.forward_removed)
    _add_columns(params, ("forward_new_rooms", "forward_new_events"), plan.forward_added)
    _add_columns(params, ("backward_gone_rooms", "backward_gone_events"), plan.backward_removed)
    _add_columns(params, ("backward_new_rooms", "backward_new_events"), plan.backward_added)
    return params


def _add_columns(params: dict[str, Any], names: tuple[str, ...], rows: Iterable[Any]) -> None:
    """Rows of text tuples to one array per column, the shape `unnest` takes."""
    columns = list(zip(*rows, strict=True))
    for index, name in enumerate(names):
        params[name] = TextArray(columns[index]) if columns else TextArray()
