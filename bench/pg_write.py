"""The write path against PostgreSQL alone, beside a bare COPY of the same rows.

No HTTP, no validation, no lanes, no other process: the workload's events
are linked and written batch after batch over one connection the way a lane
does it (BEGIN + `LOAD_BATCH`, `dag.link_batch`, `WRITE_BATCH` + COMMIT, from
`persister.storage.events_txn`), then the same rows are written by the
ceiling's COPY (`persister.bench.ceiling`) at the same batch size. For each
it prints events/s and the CPU the PostgreSQL backend and this client spent
per event. The backend's CPU is read from /proc, so the server must run on
this machine.

CPU per event is far steadier than throughput on a shared machine, so it is
the figure to compare changes of the SQL or the schema by (run it before and
after, alternated). The shard-map and liveness fences are left out: they
cost the same per transaction whatever the batch holds.

    .venv/bin/python bench/pg_write.py --events 40000 --batch 600 --rounds 2
    .venv/bin/python bench/pg_write.py --events 30000 --batch 70 --against-unprepared
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persister.bench.ceiling import CeilingRow, prepare_batches, run_pass, truncate
from persister.bench.databases import (
    DEFAULT_SERVER_URL,
    bench_database_name,
    create_database,
    drop_database,
)
from persister.bench.workload import BenchRequest, WorkloadSpec, generate, prepared
from persister.dag import LinkRequest, link_batch
from persister.storage import arrays, events_txn

Connection = psycopg.AsyncConnection[tuple[object, ...]]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measured:
    name: str
    events: int
    seconds: float
    backend_cpu_s: float
    client_cpu_s: float

    def line(self) -> str:
        per = 1e6 / self.events
        return (
            f"{self.name:20s} {self.events / self.seconds:8.0f} events/s   "
            f"backend {self.backend_cpu_s * per:5.1f} us/event   "
            f"client {self.client_cpu_s * per:5.1f} us/event"
        )


def backend_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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
    rooms = list(dict.fromkeys(r.room_id for r in batch))
    events = [e for r in batch for e in r.events]
    known = {*(e.event_id for e in events), *(p for e in events for p in e.prev_event_ids)}
    params = {
        "known": arrays.TextArray(known),
        "rooms": arrays.TextArray(rooms),
        "forward": len(events),
        "backfill": 0,
    }
    cur = conn.cursor()
    async with conn.pipeline():
        await cur.execute(events_txn.BEGIN)
        await cur.execute(events_txn.LOAD_BATCH, params, prepare=True)
    view, drawn = events_txn.view_from_rows(await cur.fetchall())
    plan = link_batch(view, batch)
    orderings = drawn[events_txn.DRAWN_FORWARD][: len(plan.new_events)]
    async with conn.pipeline():
        await events_txn.write_plan_txn(
            cur, plan, orderings, view.room_versions, "pg-write", int(time.time() * 1000), None
        )
        await events_txn.commit_txn(cur)
    return len(plan.new_events)


async def persister_pass(
    url: str, requests: Sequence[BenchRequest], size: int, lanes: int
) -> Measured:
    """Each lane its rooms (by the writer's rule) and its connection, all at once."""
    shares: list[list[BenchRequest]] = [[] for _ in range(lanes)]
    for request in requests:
        shares[zlib.crc32(request.room_id.encode()) % lanes].append(request)
    conns: list[Connection] = []
    try:
        for _ in range(lanes):
            conns.append(await psycopg.AsyncConnection.connect(url, autocommit=True))
            await events_txn.prepare_connection(conns[-1])
        pids = [conn.info.backend_pid for conn in conns]
        work = [list(batches(share, size)) for share in shares]
        cpu0, client0, wall0 = _backends_cpu_s(pids), time.process_time(), time.perf_counter()
        written = await asyncio.gather(*(_lane(c, w) for c, w in zip(conns, work, strict=True)))
        return Measured(
            f"persister ({lanes} lane{'s' if lanes > 1 else ''})",
            sum(written),
            time.perf_counter() - wall0,
            _backends_cpu_s(pids) - cpu0,
            time.process_time() - client0,
        )
    finally:
        for conn in conns:
            await conn.close()


async def _lane(conn: Connection, work: list[list[LinkRequest]]) -> int:
    written = 0
    for batch in work:
        written += await write_batch(conn, batch)
    return written


async def prepared_against_unprepared(
    url: str, requests: Sequence[BenchRequest], size: int
) -> tuple[float, float]:
    """Backend CPU per transaction (s), prepared statements vs none.

    Batches alternate between two connections, so both meet the same
    machine load and the same table sizes: on a shared machine a difference
    too small to see between two runs shows here."""
    # `lane`: set up as a writer lane; `plain`: the same, preparing nothing.
    lane = await psycopg.AsyncConnection.connect(url, autocommit=True)
    plain = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        for conn in (lane, plain):
            await events_txn.prepare_connection(conn)
        plain.prepare_threshold = None  # psycopg then prepares nothing at all
        spent = {lane: 0.0, plain: 0.0}
        count = {lane: 0, plain: 0}
        for index, batch in enumerate(batches(requests, size)):
            conn = (lane, plain)[index % 2]
            before = backend_cpu_s(conn.info.backend_pid)
            await write_batch(conn, batch)
            spent[conn] += backend_cpu_s(conn.info.backend_pid) - before
            count[conn] += 1
        return spent[lane] / count[lane], spent[plain] / count[plain]
    finally:
        await lane.close()
        await plain.close()


def _backends_cpu_s(pids: Sequence[int]) -> float:
    return sum(backend_cpu_s(pid) for pid in pids)


def copy_pass(url: str, requests: Sequence[BenchRequest], size: int) -> Measured:
    rows = [CeilingRow(e, r.room_version, r.backfilled) for r in requests for e in r.events]
    with psycopg.connect(url) as conn:
        truncate(conn)
        pid = conn.info.backend_pid
        prepared_batches = prepare_batches(rows, size)
        cpu0, client0 = backend_cpu_s(pid), time.process_time()
        result = run_pass(conn, "copy", prepared_batches, max_seconds=3600)
        return Measured(
            "bare COPY",
            result.events,
            result.seconds,
            backend_cpu_s(pid) - cpu0,
            time.process_time() - client0,
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=600, help="events per transaction")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lanes", type=int, default=1, help="connections writing at once")
    parser.add_argument(
        "--against-unprepared",
        action="store_true",
        help="alternate batches with a connection that prepares no statement; compare the two",
    )
    parser.add_argument("--message-bytes", type=int, default=1024)
    parser.add_argument(
        "--server", default=os.environ.get("PERSISTER_DATABASE_URL") or DEFAULT_SERVER_URL
    )
    args = parser.parse_args()

    spec = WorkloadSpec(
        events=args.events, message_bytes=args.message_bytes, big_share=0, state_share=0
    )
    requests = [r for r in generate(spec).requests if not r.resend and not r.backfilled]
    for round_ in range(1, args.rounds + 1):
        name = bench_database_name("_pgwrite")
        url = await create_database(args.server, name)
        try:
            if args.against_unprepared:
                with_, without = await prepared_against_unprepared(url, requests, args.batch)
                print(
                    f"round {round_}, batches of {args.batch} events, backend CPU per "
                    f"transaction: prepared {with_ * 1e3:.2f} ms, unprepared {without * 1e3:.2f} ms"
                )
                continue
            ours = await persister_pass(url, requests, args.batch, args.lanes)
            bare = await asyncio.to_thread(copy_pass, url, requests, args.batch)
        finally:
            await drop_database(args.server, name)
        print(f"round {round_}, batches of {args.batch} events:")
        print("  " + ours.line())
        print("  " + bare.line())
        ratio = (ours.backend_cpu_s / ours.events) / (bare.backend_cpu_s / bare.events)
        print(f"  backend CPU per event, persister / bare COPY: {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
