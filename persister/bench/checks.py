"""What the harness reads from the database around a run: where the stream
was, how big the transactions were, whether every acknowledged event is
stored, and the server settings that explain the figures."""

from __future__ import annotations

import os
import platform
from typing import Any

import psycopg

from persister.bench import report, stats


async def max_ordering(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT coalesce(max(stream_ordering), 0) FROM events")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def batch_sizes(database_url: str, after: int) -> report.BatchSizes | None:
    """Rows written by one transaction share its xmin: count events per xmin."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM events WHERE stream_ordering > %s GROUP BY xmin::text",
            (after,),
        )
        sizes = sorted(int(row[0]) for row in await cur.fetchall())
    if not sizes:
        return None
    histogram: dict[str, int] = {}
    for size in sizes:
        bucket = stats.size_bucket(size)
        histogram[bucket] = histogram.get(bucket, 0) + 1
    return report.BatchSizes(
        transactions=len(sizes),
        mean=sum(sizes) / len(sizes),
        p50=stats.percentile(sizes, 0.5),
        p99=stats.percentile(sizes, 0.99),
        max=sizes[-1],
        histogram=histogram,
    )


async def verify(
    database_url: str, acknowledged: set[str], own_database: bool
) -> report.Verification:
    """Every acknowledged event is stored (event_id is unique, so once)."""
    ids = list(acknowledged)
    stored = 0
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for start in range(0, len(ids), 10_000):
            cur = await conn.execute(
                "SELECT count(*) FROM events WHERE event_id = ANY(%s)",
                (ids[start : start + 10_000],),
            )
            row = await cur.fetchone()
            stored += int(row[0]) if row else 0
        total = None
        if own_database:
            cur = await conn.execute("SELECT count(*) FROM events")
            row = await cur.fetchone()
            total = int(row[0]) if row else 0
    ok = stored == len(ids) and (total is None or total >= len(ids))
    return report.Verification(len(ids), stored, total, ok)


async def machine(database_url: str) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        settings = {}
        for name in ("server_version", "fsync", "synchronous_commit", "shared_buffers"):
            cur = await conn.execute(f"SHOW {name}")
            row = await cur.fetchone()
            settings[name] = row[0] if row else None
    return {
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": settings,
    }
