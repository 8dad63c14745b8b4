"""bench/rounds.py: variants parsed as written, figures summarised as median [min-max]."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from persister.bench.report import RunResult
from persister.bench.rounds import CHECKOUT, parse_variant, run_once, summarise


def _percentiles(p50: float, p99: float) -> dict[str, Any]:
    return {"samples": 10, "p50": p50, "p95": p99, "p99": p99, "p999": p99, "max": p99, "mean": p50}


def _phase(name: str, events_per_s: float, ratio: float | None, p99: float) -> dict[str, Any]:
    return {
        "name": name,
        "mode": "closed",
        "concurrency": 64,
        "target_events_per_s": None,
        "offset_s": 0.0,
        "warmup_s": 3.0,
        "measured_s": 7.0,
        "requests": 100,
        "events": 100,
        "new_events": 100,
        "events_per_s": events_per_s,
        "new_events_per_s": events_per_s,
        "events_per_s_by_instance": {"bench1": events_per_s},
        "ratio_to_ceiling": ratio,
        "latency_ms": _percentiles(5.0, p99),
        "stream_lag_ms": _percentiles(0.0, 2.0),
        "lag_unseen": 0,
        "errors": {},
        "request_sizes": {},
        "client": {},
        "cpu": {
            "wall_s": 7.0,
            "persisters_s": {},
            "postgres_bench_db_s": 1.0,
            "postgres_background_s": 0.0,
            "postgres_other_db_s": 0.0,
            "harness_s": 1.0,
            "machine_busy_fraction": 0.5,
        },
        "timeline": [],
    }


def _run(*phases: dict[str, Any]) -> RunResult:
    raw = {
        "version": 1,
        "command": [],
        "started_at": "",
        "machine": {},
        "workload_spec": {},
        "workload": {
            "rooms_active": 1,
            "events_unique": 1,
            "events_sent": 1,
            "requests": 1,
            "backfill_requests": 0,
            "resend_requests": 0,
            "state_events": 0,
            "big_events": 0,
            "forks": 0,
            "merges": 0,
            "mean_event_bytes": 1.0,
            "max_event_bytes": 1,
            "top_room_share": 1.0,
            "room_versions": {},
        },
        "generation_s": 0.0,
        "pool": {},
        "ceiling": None,
        "phases": list(phases),
        "batch_sizes": None,
        "verification": None,
    }
    return msgspec.convert(raw, RunResult)


def test_each_figure_is_the_median_of_the_rounds_with_their_range() -> None:
    runs = [
        _run(_phase("closed", 6000, 0.21, 14.0)),
        _run(_phase("closed", 8000, 0.27, 11.0)),
        _run(_phase("closed", 7000, 0.25, 30.0)),
    ]
    table = summarise({"two-lanes": runs})
    row = table.splitlines()[1]
    assert row.split()[:3] == ["two-lanes", "closed", "3"]
    assert "7000 [6000-8000]" in row
    assert "0.250 [0.210-0.270]" in row
    assert "14.0 [11.0-30.0]" in row


def test_a_phase_without_a_ceiling_shows_no_ratio() -> None:
    table = summarise({"open-only": [_run(_phase("open", 4000, None, 20.0))]})
    assert table.splitlines()[1].split()[3:5] == ["4000", "[4000-4000]"]
    assert " - " in table.splitlines()[1]


def test_variants_keep_their_phases_apart() -> None:
    table = summarise(
        {
            "a": [_run(_phase("closed", 100, 0.1, 1.0), _phase("open@0.5", 50, 0.05, 2.0))],
            "b": [_run(_phase("closed", 300, 0.3, 3.0))],
        }
    )
    assert [line.split()[:2] for line in table.splitlines()[1:]] == [
        ["a", "closed"],
        ["a", "open@0.5"],
        ["b", "closed"],
    ]


def test_a_variant_is_a_name_and_the_arguments_a_shell_would_split() -> None:
    variant = parse_variant("four-lanes=--persister-config 'my lanes.yaml' --batch 1")
    assert variant.name == "four-lanes"
    assert variant.arguments == ("--persister-config", "my lanes.yaml", "--batch", "1")
    assert variant.checkout == CHECKOUT
    assert parse_variant("plain=").arguments == ()


def test_a_variant_may_run_another_checkout(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "run.py").write_text("")
    assert parse_variant(f"base@{tmp_path}=--batch 50").checkout == tmp_path.resolve()


@pytest.mark.parametrize("text", ["no-equals-sign", "=--batch 1", "x@/nonexistent/checkout="])
def test_a_malformed_variant_is_refused_with_the_reason(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="variant"):
        parse_variant(text)


def test_another_checkout_writes_its_result_where_the_caller_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake harness writes an empty run into --out, relative to its own folder.
    checkout = tmp_path / "other"
    (checkout / "bench").mkdir(parents=True)
    result = msgspec.json.encode(_run(_phase("closed", 100, 0.1, 1.0))).decode()
    (checkout / "bench" / "run.py").write_text(
        "import pathlib, sys\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "out.mkdir(parents=True)\n"
        f"(out / 'result.json').write_text({result!r})\n"
    )
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    found, ok = run_once(parse_variant(f"base@{checkout}="), [], Path("rounds/base-1"))
    assert ok and found is not None
    assert (caller / "rounds" / "base-1" / "result.json").is_file()
    assert not (checkout / "rounds").exists()


def test_open_phases_show_how_late_the_harness_sent_their_calls() -> None:
    open_phase = {**_phase("open", 50, None, 20.0), "send_delay_ms": _percentiles(0.2, 3.0)}
    table = summarise({"a": [_run(_phase("closed", 100, 0.1, 1.0), open_phase)]})
    header, closed_row, open_row = (_cells(row) for row in table.splitlines())
    column = header.index("sent late p99 ms")
    assert closed_row[column] == "-"
    assert open_row[column] == "3.0 [3.0-3.0]"


def test_phases_show_how_many_transactions_the_persisters_found_slow() -> None:
    timed = {
        "transactions": 500, "mean_ms": 9.0, "p99_under_ms": 50.0, "slow": 4,
        "slow_over_ms": 100.0, "slowest_over_ms": 100.0,
    }  # fmt: skip
    runs = [
        _run({**_phase("open", 50, None, 20.0), "transactions": {**timed, "slow": slow}})
        for slow in (0, 4, 2)
    ]
    header, row = (_cells(line) for line in summarise({"a": runs}).splitlines())
    assert row[header.index("slow tx")] == "2 [0-4]"


def _cells(row: str) -> list[str]:
    return re.split(r"\s{2,}", row.strip())
