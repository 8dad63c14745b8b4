"""The run's result: its JSON shape, the closing table, and the chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec

from persister.bench.ceiling import CeilingReport
from persister.bench.cpu import CpuReport
from persister.bench.stats import Percentiles, TimelinePoint
from persister.bench.transactions import TransactionReport
from persister.bench.transactions import line as transactions_line
from persister.bench.wal import WalReport
from persister.bench.workload import WorkloadSummary

# The size of a full-page image before compression, for the share of the WAL
# such images take (pg_stat_wal counts them, not their bytes).
WAL_PAGE_BYTES = 8192


class PhaseResult(msgspec.Struct):
    name: str
    mode: str
    concurrency: int | None
    target_events_per_s: float | None
    # Where the phase starts on the run's time axis, and its warm-up.
    offset_s: float
    warmup_s: float
    measured_s: float
    requests: int
    events: int
    new_events: int
    events_per_s: float
    new_events_per_s: float
    events_per_s_by_instance: dict[str, float]
    ratio_to_ceiling: float | None
    latency_ms: Percentiles
    stream_lag_ms: Percentiles
    lag_unseen: int
    errors: dict[str, int]
    request_sizes: dict[str, int]
    client: dict[str, int]
    cpu: CpuReport
    timeline: list[TimelinePoint]
    # None when the server keeps no WAL statistics (before PostgreSQL 14).
    wal: WalReport | None = None
    # Open loop only: how long after their scheduled times calls left the
    # harness. Part of `latency_ms`, which counts from the schedule.
    send_delay_ms: Percentiles | None = None
    # What the persisters' own histograms say of the phase's transactions;
    # None if their /metrics could not be read.
    transactions: TransactionReport | None = None


class BatchSizes(msgspec.Struct):
    """Events per committed transaction, from the rows' xmin (exact)."""

    transactions: int
    mean: float
    p50: float
    p99: float
    max: int
    histogram: dict[str, int]


class Verification(msgspec.Struct):
    acknowledged_events: int
    stored_of_acknowledged: int
    stored_in_database: int | None
    ok: bool


class RunResult(msgspec.Struct):
    version: int
    command: list[str]
    started_at: str
    machine: dict[str, Any]
    workload_spec: dict[str, Any]
    workload: WorkloadSummary
    generation_s: float
    pool: dict[str, Any]
    ceiling: CeilingReport | None
    phases: list[PhaseResult]
    batch_sizes: BatchSizes | None
    verification: Verification | None


def write_json(result: RunResult, path: Path) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2) + b"\n")


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def table(result: RunResult) -> str:
    """The closing table: one row per phase, then the ceiling passes."""
    head = (
        f"{'phase':<12}{'events/s':>10}{'ratio':>7}{'p50':>8}{'p95':>8}{'p99':>8}"
        f"{'p99.9':>8}{'max':>8}{'lag p50':>9}{'lag p99':>9}{'errors':>8}"
        f"{'cpu pers':>9}{'cpu pg':>8}"
    )
    lines = ["latency in ms; cpu in seconds over the measured window", head, "-" * len(head)]
    for phase in result.phases:
        lines.append(_phase_row(phase))
        for instance, rate in sorted(phase.events_per_s_by_instance.items()):
            lines.append(f"  {instance:<10}{rate:>10.0f}")
        if phase.send_delay_ms is not None:
            lines.append(f"  {send_delay_line(phase.send_delay_ms)}")
        if phase.transactions is not None:
            lines.append(f"  {transactions_line(phase.transactions)}")
        if phase.wal is not None:
            lines.append(f"  {wal_line(phase.wal)}")
    if result.ceiling is not None:
        lines += ["", "bare ceiling (same rows, same tables, commit per batch):"]
        for c in result.ceiling.results:
            lines.append(
                f"  {c.method:<7} batch {c.batch:>5}: {c.events_per_s:>9.0f} events/s "
                f"({c.events} events in {c.seconds:.2f}s)"
            )
        lines.append(
            f"  ceiling = {result.ceiling.ceiling_events_per_s:.0f} events/s "
            f"({result.ceiling.ceiling_method})"
        )
    if result.batch_sizes is not None:
        b = result.batch_sizes
        lines.append(
            f"\nevents per commit: mean {b.mean:.1f}, p50 {b.p50:.0f}, p99 {b.p99:.0f}, "
            f"max {b.max} over {b.transactions} transactions"
        )
    if result.verification is not None:
        v = result.verification
        lines.append(
            f"verification: {v.stored_of_acknowledged}/{v.acknowledged_events} "
            f"acknowledged events stored once -> {'OK' if v.ok else 'FAILED'}"
        )
    return "\n".join(lines)


def _phase_row(p: PhaseResult) -> str:
    ratio = "-" if p.ratio_to_ceiling is None else f"{p.ratio_to_ceiling:.2f}"
    lat, lag = p.latency_ms, p.stream_lag_ms
    pg = p.cpu.postgres_bench_db_s + p.cpu.postgres_background_s
    return (
        f"{p.name:<12}{p.new_events_per_s:>10.0f}{ratio:>7}{_ms(lat.p50):>8}{_ms(lat.p95):>8}"
        f"{_ms(lat.p99):>8}{_ms(lat.p999):>8}{_ms(lat.max):>8}{_ms(lag.p50):>9}"
        f"{_ms(lag.p99):>9}{sum(p.errors.values()):>8}"
        f"{sum(p.cpu.persisters_s.values()):>9.1f}{pg:>8.1f}"
    )


def send_delay_line(delay: Percentiles) -> str:
    """How late the harness itself sent an open phase's calls, as the table shows it."""
    return (
        f"harness sent calls late by p50 {_ms(delay.p50)}, p99 {_ms(delay.p99)}, "
        f"max {_ms(delay.max)} ms (included in the latency above)"
    )


def wal_line(w: WalReport) -> str:
    """The server's WAL over a phase's measured window, as the table shows it."""
    per_event = "-" if w.bytes_per_event is None else f"{w.bytes_per_event / 1024:.1f} KiB/event"
    images = f"{w.full_page_images * WAL_PAGE_BYTES / w.bytes:.0%}" if w.bytes else "-"
    return (
        f"server WAL {w.bytes / 2**20:.0f} MiB ({per_event}, full-page images ~{images}), "
        f"{w.checkpoints} checkpoint(s) begun, WAL buffers full {w.buffers_full} times"
    )


def chart(result: RunResult, path: Path) -> bool:
    """Throughput and p99 latency per second; False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    for index, phase in enumerate(result.phases):
        _plot_phase(top, bottom, phase, f"C{index}")  # one colour per phase
    if result.ceiling is not None:
        top.axhline(
            result.ceiling.ceiling_events_per_s, color="grey", linestyle="--", label="bare ceiling"
        )
    top.set_ylabel("events/s")
    top.legend(loc="lower right", fontsize="small")
    bottom.set_ylabel("ms (per-second p99)")
    bottom.set_yscale("log")
    bottom.set_xlabel("seconds since the first phase started (warm-up shaded)")
    bottom.legend(loc="upper right", fontsize="small")
    fig.suptitle(_title(result), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_phase(top: Any, bottom: Any, phase: PhaseResult, colour: str) -> None:
    for axis in (top, bottom):
        axis.axvspan(phase.offset_s, phase.offset_s + phase.warmup_s, color="0.92")
    t = [p.t_s for p in phase.timeline]
    top.plot(t, [p.events_per_s for p in phase.timeline], color=colour, label=phase.name)
    p99 = [math.nan if p.p99_ms is None else p.p99_ms for p in phase.timeline]
    bottom.plot(t, p99, color=colour, label=f"{phase.name} persist p99")
    lags = [math.nan if p.lag_p99_ms is None else p.lag_p99_ms for p in phase.timeline]
    bottom.plot(t, lags, color=colour, linestyle=":", label=f"{phase.name} stream lag p99")


def _title(result: RunResult) -> str:
    spec = result.workload_spec
    return (
        f"persister bench: {result.pool.get('instances')} persister(s), "
        f"{spec.get('rooms')} rooms, {spec.get('batch')} events/request"
    )
