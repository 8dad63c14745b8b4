"""The harness run several times, variants alternated, and the spread of each figure.

On a shared machine one run of the harness says little: the same code gave
(c) ratios from 0.19 to 0.27 within an hour (bench/README.md, ninth
session). A comparison is worth something only between variants run in
turn, several times, and read as medians with their range. This runs
`bench/run.py` once per variant per round, in the same order each round, each
run into a folder of its own, and summarises their `result.json` files.

A variant is a name, extra harness arguments, and optionally another
checkout to run (`NAME@DIR=ARGS`), so that two revisions can be compared:

    python bench/rounds.py --rounds 3 --variant 'two-lanes=' \\
        --variant 'four-lanes=--persister-config lanes4.yaml' -- \\
        --batch 1 --concurrency 64 --mode closed --duration 10 --events 150000
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from persister.bench.report import PhaseResult, RunResult

CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Variant:
    name: str
    arguments: tuple[str, ...]
    checkout: Path


def parse_variant(text: str) -> Variant:
    """`NAME=ARGS` or `NAME@DIR=ARGS` (ARGS split as a shell would)."""
    head, separator, arguments = text.partition("=")
    name, _, checkout = head.partition("@")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=ARGS or NAME@DIR=ARGS, not {text!r}")
    root = Path(checkout).resolve() if checkout else CHECKOUT
    if not (root / "bench" / "run.py").is_file():
        raise argparse.ArgumentTypeError(f"variant {name}: no bench/run.py under {root}")
    return Variant(name, tuple(shlex.split(arguments)), root)


@dataclass(frozen=True)
class Figure:
    """One figure of one phase over the rounds of one variant."""

    values: tuple[float, ...]

    def cell(self, digits: int) -> str:
        if not self.values:
            return "-"
        low, high = min(self.values), max(self.values)
        return f"{statistics.median(self.values):.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


# What the summary shows of each phase, and how many decimals.
FIGURES: tuple[tuple[str, int, Callable[[PhaseResult], float | None]], ...] = (
    ("events/s", 0, lambda p: p.events_per_s),
    ("ratio", 3, lambda p: p.ratio_to_ceiling),
    ("p50 ms", 1, lambda p: p.latency_ms.p50),
    ("p99 ms", 1, lambda p: p.latency_ms.p99),
    ("lag p99 ms", 1, lambda p: p.stream_lag_ms.p99),
    # Open phases: the part of their latency the harness added by sending late.
    ("sent late p99 ms", 1, lambda p: None if p.send_delay_ms is None else p.send_delay_ms.p99),
    # Transactions the persisters timed over 100 ms: a tail from the database.
    ("slow tx", 0, lambda p: None if p.transactions is None else p.transactions.slow),
)


def summarise(results: dict[str, list[RunResult]]) -> str:
    """Per variant and phase: each figure's median over the rounds, [min-max]."""
    header = ["variant", "phase", "rounds", *(name for name, _, _ in FIGURES)]
    rows = [header]
    for variant, runs in results.items():
        for phase in _phase_names(runs):
            phases = [p for run in runs for p in run.phases if p.name == phase]
            cells = [variant, phase, str(len(phases))]
            for _, digits, pick in FIGURES:
                values = tuple(v for v in (pick(p) for p in phases) if v is not None)
                cells.append(Figure(values).cell(digits))
            rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _phase_names(runs: Sequence[RunResult]) -> list[str]:
    return list(dict.fromkeys(p.name for run in runs for p in run.phases))


def run_once(variant: Variant, common: Sequence[str], out: Path) -> tuple[RunResult | None, bool]:
    """One harness run of `variant`: its result (None if it wrote none), and
    whether it succeeded (a failed verification fails it too)."""
    # The run starts in the checkout's folder: a relative `out` would land there.
    out = out.resolve()
    command = [sys.executable, str(variant.checkout / "bench" / "run.py")]
    command += [*common, *variant.arguments, "--out", str(out)]
    print(f"== {variant.name}: {shlex.join(command[1:])}", flush=True)
    # From the checkout's folder, the pool's `python -m persister` imports
    # that checkout's code too, not the one installed in the environment.
    finished = subprocess.run(command, cwd=variant.checkout, check=False)
    path = out / "result.json"
    if finished.returncode != 0:
        print(f"== {variant.name}: the harness exited with {finished.returncode}", flush=True)
    result = msgspec.json.decode(path.read_bytes(), type=RunResult) if path.is_file() else None
    return result, finished.returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every run of bench/run.py.",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        help="NAME=ARGS or NAME@DIR=ARGS (repeat; none: one variant, 'default=')",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/rounds"))
    parser.add_argument("common", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    common = args.common[1:] if args.common[:1] == ["--"] else args.common
    variants: list[Variant] = args.variant or [parse_variant("default=")]
    if len({v.name for v in variants}) != len(variants):
        parser.error("variant names must differ")
    results: dict[str, list[RunResult]] = {v.name: [] for v in variants}
    failed = 0
    for round_ in range(1, args.rounds + 1):
        for variant in variants:
            result, ok = run_once(variant, common, args.out / f"{variant.name}-{round_}")
            failed += not ok
            if result is not None:
                results[variant.name].append(result)
    print(summarise(results))
    if failed:
        print(f"{failed} run(s) failed: see their output above", flush=True)
    return 1 if failed else 0
