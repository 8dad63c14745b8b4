"""The options of `persister bench` (and bench/run.py), and the workload
spec they describe."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from persister.bench.workload import WorkloadSpec
from persister.client import ClientOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options; `persister bench` and bench/run.py share them."""
    target = parser.add_argument_group("target")
    target.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="an existing pool's config (repeatable); default: start a pool",
    )
    target.add_argument("--instances", type=int, default=1, help="persisters of a started pool")
    target.add_argument(
        "--persister-config",
        action="append",
        default=[],
        metavar="FILE",
        help="extra config layered over a started pool's (tuning runs)",
    )
    target.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL server for started pools and the ceiling "
        "(default $PERSISTER_DATABASE_URL or the local server)",
    )
    target.add_argument("--redis-url", default=None, help="default $PERSISTER_REDIS_URL")
    target.add_argument("--keep-db", action="store_true", help="keep the started pool's database")
    _workload_arguments(parser.add_argument_group("workload"))
    _load_arguments(parser.add_argument_group("load"))
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for result.json, chart.png and logs (default bench/results/<timestamp>)",
    )


def _workload_arguments(group: argparse._ArgumentGroup) -> None:
    d = WorkloadSpec()
    group.add_argument("--rooms", type=int, default=d.rooms)
    group.add_argument(
        "--events",
        type=int,
        default=600_000,
        help="events generated up front, per phase (a phase ends early if they run "
        "out, and its last seconds, with only the busiest rooms left, read low): "
        "the default lasts a 20 s phase at 30,000 events/s",
    )
    group.add_argument("--batch", type=int, default=d.batch, help="events per request (K)")
    group.add_argument(
        "--zipf", type=float, default=d.zipf_s, help="Zipf exponent of room activity"
    )
    group.add_argument(
        "--room-versions",
        default=",".join(d.room_versions),
        help="comma-separated, assigned to rooms in turn",
    )
    group.add_argument("--senders", type=int, default=d.senders_busy, help="senders per busy room")
    group.add_argument("--fork-rate", type=float, default=d.fork_rate)
    group.add_argument("--merge-rate", type=float, default=d.merge_rate)
    group.add_argument("--max-prevs", type=int, default=d.max_prevs)
    group.add_argument("--state-share", type=float, default=d.state_share)
    group.add_argument(
        "--big-share", type=float, default=d.big_share, help="share of events near the 64 KB limit"
    )
    group.add_argument(
        "--message-bytes",
        type=int,
        default=None,
        help="every message this long (default: 200 B - 2 KB, log-uniform)",
    )
    group.add_argument("--backfill-share", type=float, default=d.backfill_share)
    group.add_argument("--resend-share", type=float, default=d.resend_share)
    group.add_argument("--seed", type=int, default=d.seed)
    group.add_argument(
        "--run-id", default=None, help="salt of room IDs (default: new per run, so events are new)"
    )
    group.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1)


def _niceness(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"{value} is not a niceness from 0 to 19")
    return value


def _load_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--harness-nice",
        type=_niceness,
        default=0,
        help="lower the harness's own CPU priority by this much (0-19) once the pool runs, "
        "so that on a small machine it takes CPU the pool and PostgreSQL would use "
        "only when they leave some (creators run on other machines in production)",
    )
    group.add_argument(
        "--mode",
        choices=("closed", "open", "both"),
        default="closed",
        help="both: closed loop, then open loop at --open-fraction of its rate",
    )
    group.add_argument(
        "--concurrency", type=int, default=64, help="closed loop: requests in flight"
    )
    group.add_argument("--rate", type=float, default=None, help="open loop: target events/s")
    group.add_argument(
        "--no-coalesce",
        dest="coalesce",
        action="store_false",
        help="open loop: send every request on its own, even those of a room that wait "
        "behind its request in flight (the client coalesces them by default)",
    )
    group.add_argument(
        "--batch-max-requests",
        type=int,
        default=ClientOptions().batch_max_requests,
        help="the client sends requests of different rooms that leave at the same moment "
        "to their persister in HTTP requests of at most this many; 0: each alone",
    )
    group.add_argument(
        "--max-small-exchanges",
        type=int,
        default=ClientOptions().max_small_exchanges,
        help="the client holds requests for a persister while this many HTTP requests of "
        "under --small-exchange-bytes to it are unanswered, and sends them together; 0: never",
    )
    group.add_argument(
        "--small-exchange-bytes",
        type=int,
        default=ClientOptions().small_exchange_bytes,
        help="see --max-small-exchanges",
    )
    group.add_argument("--open-fraction", type=float, default=0.5)
    group.add_argument(
        "--duration", type=float, default=20.0, help="seconds per phase, warm-up included"
    )
    group.add_argument(
        "--warmup", type=float, default=3.0, help="seconds excluded from the figures"
    )
    group.add_argument(
        "--max-events",
        type=int,
        default=None,
        help="end a phase after this many acknowledged events",
    )
    group.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the bare COPY/UNNEST baseline",
    )
    group.add_argument(
        "--ceiling-seconds",
        type=float,
        default=4.0,
        help="time cap of each ceiling pass at batches under 1000 (those at 1000 write every row)",
    )
    group.add_argument(
        "--ceiling-events",
        type=int,
        default=None,
        help="rows the ceiling writes (default: every event the workload sends: the same rows)",
    )


def spec_from_args(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        rooms=args.rooms,
        events=args.events,
        batch=args.batch,
        zipf_s=args.zipf,
        room_versions=tuple(v.strip() for v in args.room_versions.split(",") if v.strip()),
        senders_busy=args.senders,
        fork_rate=args.fork_rate,
        merge_rate=args.merge_rate,
        max_prevs=args.max_prevs,
        state_share=args.state_share,
        big_share=args.big_share,
        message_bytes=args.message_bytes,
        backfill_share=args.backfill_share,
        resend_share=args.resend_share,
        seed=args.seed,
        run_id=args.run_id or f"{int(time.time() * 1000):x}",
    )
