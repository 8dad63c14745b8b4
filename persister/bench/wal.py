"""What the server wrote to its WAL over a phase, and the checkpoints it began.

The WAL is what the server's disk and its replicas must keep up with, and
it varies with the server's state as well as with the pool: a closed loop
writes enough of it to set off a checkpoint that then runs into the next
phase, and every page first touched after a checkpoint begins goes to the
WAL whole (a full-page image). The report puts these next to the phase's
figures, so that two runs can be compared knowing whether they differ
there (bench/README.md, twelfth session).

The counters are the whole server's (`pg_stat_wal` and the checkpointer's
statistics), like `postgres_background_s` of the CPU report: on a shared
server other users' writes count too. A busy backend adds its share to them
about once a second, so a window's figures are off by up to a second's
worth at each end.
"""

from __future__ import annotations

from typing import Any

import msgspec
import psycopg

# pg_stat_wal appeared in PostgreSQL 14; PostgreSQL 17 moved the checkpoint
# counts from pg_stat_bgwriter to pg_stat_checkpointer.
FIRST_WITH_WAL_STATS = 140000
FIRST_WITH_CHECKPOINTER_VIEW = 170000

WAL_COUNTERS = "SELECT wal_records, wal_fpi, wal_bytes::bigint, wal_buffers_full FROM pg_stat_wal"
CHECKPOINTS_BEFORE_17 = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"
CHECKPOINTS = "SELECT num_timed + num_requested FROM pg_stat_checkpointer"


class WalCounters(msgspec.Struct, frozen=True):
    records: int
    full_page_images: int
    bytes: int
    # Times a backend found the WAL buffers full and wrote them out itself.
    buffers_full: int
    checkpoints: int


class WalReport(msgspec.Struct):
    bytes: int
    records: int
    full_page_images: int
    buffers_full: int
    # Begun in the window, whether by time or by WAL volume.
    checkpoints: int
    bytes_per_event: float | None


async def read_counters(conn: psycopg.AsyncConnection[Any]) -> WalCounters | None:
    """The server's counters now; None on a server too old to keep them.
    `conn` must be in autocommit mode: a transaction keeps the statistics
    it read first."""
    version = conn.info.server_version
    if version < FIRST_WITH_WAL_STATS:
        return None
    wal = await (await conn.execute(WAL_COUNTERS)).fetchone()
    query = CHECKPOINTS if version >= FIRST_WITH_CHECKPOINTER_VIEW else CHECKPOINTS_BEFORE_17
    checkpoints = await (await conn.execute(query)).fetchone()
    assert wal is not None and checkpoints is not None  # one-row views
    return WalCounters(
        records=wal[0],
        full_page_images=wal[1],
        bytes=wal[2],
        buffers_full=wal[3],
        checkpoints=checkpoints[0],
    )


def report(before: WalCounters, after: WalCounters, events: int) -> WalReport | None:
    """The window's figures; None if the server's statistics were reset in it
    (`pg_stat_reset_shared`), when the differences mean nothing."""
    if after.records < before.records or after.checkpoints < before.checkpoints:
        return None
    written = after.bytes - before.bytes
    return WalReport(
        bytes=written,
        records=after.records - before.records,
        full_page_images=after.full_page_images - before.full_page_images,
        buffers_full=after.buffers_full - before.buffers_full,
        checkpoints=after.checkpoints - before.checkpoints,
        bytes_per_event=written / events if events else None,
    )
