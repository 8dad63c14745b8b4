"""The write path against PostgreSQL alone, beside a bare COPY of the same rows.

No HTTP, no validation, no other process: the workload's events are linked
and written batch after batch over one connection per lane the way a lane
does it (`persister.bench.direct_write`), then the same rows are written by the
ceiling's COPY (`persister.bench.ceiling`) at the same batch size. For each
it prints events/s and the CPU the PostgreSQL backend and this client spent
per event. The backend's CPU is read from /proc, so the server must run on
this machine.

CPU per event is far steadier than throughput on a shared machine, so it is
the figure to compare changes of the SQL or the schema by (run it before and
after, alternated).

    .venv/bin/python bench/pg_write.py --events 40000 --batch 600 --rounds 2
    .venv/bin/python bench/pg_write.py --events 30000 --batch 70 --against custom-plans
    .venv/bin/python bench/pg_write.py --events 40000 --batch 32 --lanes 2 --request-events 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import zlib
from collections.abc import Sequence
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
from persister.bench.direct_write import Connection, batches, write_batch
from persister.bench.workload import BenchRequest, WorkloadSpec, generate
from persister.dag import LinkRequest
from persister.storage import events_txn

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


# What `--against` compares a lane's connection with: one that plans the
# prepared statements at each execution with the planner's default plan shapes
# (how lanes ran before commit cc866fb). Comparing with a connection that
# prepares nothing (`unprepared`) went with psycopg's pipelines (commit aa8e0e5).
AGAINST = ("custom-plans",)
CUSTOM_PLANS = (
    "SET plan_cache_mode = force_custom_plan",
    "RESET enable_seqscan",
    "RESET enable_hashjoin",
    "RESET enable_mergejoin",
    "RESET enable_bitmapscan",
)


async def lane_against(
    url: str, requests: Sequence[BenchRequest], size: int, against: str
) -> tuple[float, float]:
    """Backend CPU per transaction (s): a lane's connection vs `against`.

    Batches alternate between the two connections, so both meet the same
    machine load and the same table sizes: on a shared machine a difference
    too small to see between two runs shows here."""
    lane = await psycopg.AsyncConnection.connect(url, autocommit=True)
    other = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        for conn in (lane, other):
            await events_txn.prepare_connection(conn)
        for setting in CUSTOM_PLANS:
            await other.execute(setting)
        spent = {lane: 0.0, other: 0.0}
        count = {lane: 0, other: 0}
        for index, batch in enumerate(batches(requests, size)):
            conn = (lane, other)[index % 2]
            before = backend_cpu_s(conn.info.backend_pid)
            await write_batch(conn, batch)
            spent[conn] += backend_cpu_s(conn.info.backend_pid) - before
            count[conn] += 1
        return spent[lane] / count[lane], spent[other] / count[other]
    finally:
        await lane.close()
        await other.close()


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
    parser.add_argument(
        "--request-events",
        type=int,
        default=50,
        help="events per persist request; a transaction never splits one (1: a lane's "
        "batches hold many rooms, as under single-event load)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lanes", type=int, default=1, help="connections writing at once")
    parser.add_argument(
        "--against",
        choices=AGAINST,
        help="alternate batches between a lane's connection and one that plans its "
        "statements at each execution (custom-plans); compare",
    )
    parser.add_argument("--message-bytes", type=int, default=1024)
    parser.add_argument(
        "--server", default=os.environ.get("PERSISTER_DATABASE_URL") or DEFAULT_SERVER_URL
    )
    args = parser.parse_args()

    spec = WorkloadSpec(
        events=args.events,
        batch=args.request_events,
        message_bytes=args.message_bytes,
        big_share=0,
        state_share=0,
    )
    requests = [r for r in generate(spec).requests if not r.resend and not r.backfilled]
    for round_ in range(1, args.rounds + 1):
        name = bench_database_name("_pgwrite")
        url = await create_database(args.server, name)
        try:
            if args.against:
                lane, other = await lane_against(url, requests, args.batch, args.against)
                print(
                    f"round {round_}, batches of {args.batch} events, backend CPU per "
                    f"transaction: lane {lane * 1e3:.2f} ms, {args.against} {other * 1e3:.2f} ms"
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
