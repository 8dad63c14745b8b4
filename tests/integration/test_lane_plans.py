"""A lane plans its two statements once, so each plan must suit every table size.

The plan a lane's connection makes on its first batch serves every later
batch of that connection (`events_txn.prepare_connection`). These tests read
the plans PostgreSQL actually runs (auto_explain, sent to the client as
notices) on empty tables and again once they have grown.
"""

from __future__ import annotations

import psycopg
import pytest

from persister.bench.direct_write import batches, write_batch
from persister.bench.workload import WorkloadSpec, generate
from persister.storage import events_txn

SPEC = WorkloadSpec(rooms=50, events=2_000, state_share=0, big_share=0, message_bytes=200)
# What a plan made on small tables would keep as they grow, and the bitmap
# scan, which never marks the index entries of dead rows as dead: each batch
# would walk every forward extremity its rooms ever had, until a vacuum.
UNWANTED_NODES = ("Seq Scan", "Hash Join", "Merge Join", "Bitmap Heap Scan", "Bitmap Index Scan")


async def _explaining(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[str]:
    plans: list[str] = []
    conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
    try:
        await conn.execute("LOAD 'auto_explain'")
    except psycopg.errors.UndefinedFile:
        pytest.skip("this PostgreSQL has no auto_explain module")
    for setting in ("log_min_duration = 0", "log_level = notice", "log_nested_statements = on"):
        await conn.execute(f"SET auto_explain.{setting}")
    return plans


def _unwanted(plans: list[str]) -> list[str]:
    return [
        line.strip()
        for plan in plans
        for line in plan.splitlines()
        if any(node in line for node in UNWANTED_NODES)
    ]


def _whole_index_scans(plans: list[str]) -> list[str]:
    """Index scans without an Index Cond: they walk the whole index (with
    the planner's other ways disabled, that is how it reads a whole table)."""
    found = []
    for plan in plans:
        lines = plan.splitlines()
        for at, line in enumerate(lines):
            if "Index Scan using" not in line and "Index Only Scan using" not in line:
                continue
            node = []
            for detail in lines[at + 1 :]:
                if "->" in detail:
                    break
                node.append(detail)
            if not any("Index Cond" in detail for detail in node):
                found.append(line.strip())
    return found


async def test_a_lane_reaches_every_table_by_index_on_empty_and_on_grown_tables(
    database_url: str,
) -> None:
    requests = [r for r in generate(SPEC).requests if not r.resend and not r.backfilled]
    work = list(batches(requests, 50))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await events_txn.prepare_connection(conn)
        plans = await _explaining(conn)
        await write_batch(conn, work[0])
        first = list(plans)
        for batch in work[1:-1]:
            await write_batch(conn, batch)
        plans.clear()
        await write_batch(conn, work[-1])
        last = list(plans)
        stored = await (await conn.execute("SELECT count(*) FROM events")).fetchone()

    assert stored is not None and stored[0] > 1_500
    for plans_of_a_batch in (first, last):
        statements = [p for p in plans_of_a_batch if p.startswith("duration:")]
        assert any("Insert on events" in p for p in statements), statements
        assert any("Index Scan using events_event_id_key" in p for p in statements), statements
        assert _unwanted(statements) == []
        assert _whole_index_scans(statements) == []
