"""A lane's write path over one connection, without HTTP, lanes or fences.

`write_batch` runs the two round trips of a lane's batch transaction
(BEGIN + `LOAD_BATCH`, `dag.link_batch`, `WRITE_BATCH` + COMMIT, from
`persister.storage.events_txn`) for requests that are already valid, so the
SQL can be measured (`bench/pg_write.py`) and inspected (its tests) on its
own. The shard-map and liveness fences are left out: they cost the same per
transaction whatever the batch holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import psycopg

from persister.bench.workload import BenchRequest, prepared
from persister.dag import LinkRequest, link_batch
from persister.storage import events_txn, pipeline

Connection = psycopg.AsyncConnection[tuple[object, ...]]


def batches(requests: Sequence[BenchRequest], size: int) -> Iterator[list[LinkRequest]]:
    """Requests in send order, grouped up to `size` events (a request is never split)."""
    batch: list[LinkRequest] = []
    count = 0
    for request in requests:
        if batch and count + len(request.events) > size:
            yield batch
            batch, count = [], 0
        events = [prepared(e) for e in request.events]
        batch.append(LinkRequest(request.room_id, request.room_version, request.backfilled, events))
        count += len(events)
    if batch:
        yield batch


async def write_batch(conn: Connection, batch: list[LinkRequest]) -> int:
    """Link and write one batch in its own transaction; returns the events written.

    `conn` must have been set up by `events_txn.prepare_connection`."""
    rooms = list(dict.fromkeys(r.room_id for r in batch))
    events = [e for r in batch for e in r.events]
    prevs = [p for e in events for p in e.prev_event_ids]
    load = events_txn.load_command(rooms, [e.event_id for e in events], prevs, (len(events), 0))
    _, loaded = await pipeline.round_trip(conn, (events_txn.BEGIN, load))
    view, drawn = events_txn.view_from_rows(pipeline.rows(conn, loaded))
    plan = link_batch(view, batch)
    orderings = drawn[events_txn.DRAWN_FORWARD][: len(plan.new_events)]
    write = events_txn.write_command(
        plan, orderings, view.room_versions, "direct", int(time.time() * 1000), None
    )
    await events_txn.commit_txn(conn, write)
    return len(plan.new_events)
