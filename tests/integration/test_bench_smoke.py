"""The load harness end to end, briefly: its own 1-instance pool for ~3 s,
and the workload generator's promises (reproducible, prevs sent first).

It runs as a subprocess, as a user runs it (`bench/run.py`), so the pool's
processes and the harness's event loop are not the test session's. The
numbers are only checked for sanity: this is not a performance test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

from persister.bench.workload import WorkloadSpec, generate
from persister.devservices import Services
from persister.storage.migrate import MAINTENANCE_DB, with_database

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 180


def run_bench(services: Services, out: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, str(REPO / "bench" / "run.py"),
        "--database-url", services.database_url, "--redis-url", services.redis_url,
        "--instances", "1", "--duration", "3", "--warmup", "0.5",
        "--rooms", "40", "--events", "16000", "--batch", "10", "--concurrency", "16",
        "--resend-share", "0.05", "--backfill-share", "0.05", "--room-versions", "10,11,12",
        "--ceiling-seconds", "0.3", "--ceiling-events", "1000",
        "--keep-db", "--gen-workers", "1", "--harness-nice", "5", "--out", str(out),
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO, check=False
    )


def stored_counts(database_url: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def drop(services: Services, name: str) -> None:
    maintenance = with_database(services.database_url, MAINTENANCE_DB)
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def result(services: Services, out: Path) -> Any:
    # One run serves every test of the module: it takes ~10 s.
    finished = run_bench(services, out)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    data = msgspec.json.decode((out / "result.json").read_bytes())
    yield data
    drop(services, data["pool"]["database"])


def test_bench_run_acknowledges_events_and_stores_each_once(
    result: Any, services: Services, out: Path
) -> None:
    phase = result["phases"][0]
    assert phase["events"] > 0 and phase["events_per_s"] > 0
    assert phase["errors"] == {}
    assert phase["send_delay_ms"] is None  # closed loop: a call leaves when it is sent
    assert (
        0 < phase["latency_ms"]["p50"] <= phase["latency_ms"]["p99"] <= phase["latency_ms"]["max"]
    )
    verification = result["verification"]
    assert verification["ok"] is True
    assert verification["stored_of_acknowledged"] == verification["acknowledged_events"] > 0
    url = with_database(services.database_url, result["pool"]["database"])
    total, distinct = stored_counts(url)
    assert total == distinct == verification["stored_in_database"]
    assert total >= verification["acknowledged_events"]
    assert (out / "chart.png").stat().st_size > 0


def test_bench_run_measures_the_ceiling_and_the_ratio(result: Any) -> None:
    ceiling = result["ceiling"]
    assert {(r["method"], r["batch"]) for r in ceiling["results"]} == {
        (m, b) for m in ("copy", "unnest") for b in (1000, 100, 1)
    }
    assert ceiling["ceiling_events_per_s"] > 0
    assert result["phases"][0]["ratio_to_ceiling"] > 0


def test_bench_run_reports_the_wal_the_server_wrote_in_the_phase(
    result: Any, services: Services
) -> None:
    with psycopg.connect(with_database(services.database_url, result["pool"]["database"])) as conn:
        if conn.info.server_version < 140000:
            pytest.skip("PostgreSQL before 14 keeps no WAL statistics")
    phase = result["phases"][0]
    wal = phase["wal"]
    # Every acknowledged event was committed, so written to the WAL.
    assert wal["records"] > phase["new_events"] > 0
    assert wal["bytes_per_event"] == wal["bytes"] / phase["new_events"]
    assert wal["checkpoints"] >= 0 and wal["buffers_full"] >= 0


def test_bench_run_reports_the_transactions_the_persisters_timed(result: Any) -> None:
    timed = result["phases"][0]["transactions"]
    # The phase's window, read from the persister's /metrics, inside the run.
    assert 0 < timed["transactions"] <= result["batch_sizes"]["transactions"]
    assert timed["mean_ms"] > 0 and 0 <= timed["slow"] <= timed["transactions"]


def test_workload_is_reproducible_from_its_seed() -> None:
    spec = WorkloadSpec(
        rooms=20,
        events=600,
        batch=7,
        room_versions=("1", "10", "12"),
        backfill_share=0.1,
        resend_share=0.1,
        seed=5,
        run_id="same",
    )
    first, second = generate(spec), generate(spec)
    assert [(r.room_id, [e.event_id for e in r.events]) for r in first.requests] == [
        (r.room_id, [e.event_id for e in r.events]) for r in second.requests
    ]
    other = generate(WorkloadSpec(rooms=20, events=600, batch=7, seed=5, run_id="other"))
    assert not {e.event_id for e in first.unique_events()} & {
        e.event_id for e in other.unique_events()
    }


def test_workload_sends_each_forward_event_after_its_prevs() -> None:
    spec = WorkloadSpec(rooms=30, events=2000, batch=10, fork_rate=0.2, seed=9)
    workload = generate(spec)
    sent: set[str] = set()
    for request in workload.requests:
        for event in request.events:
            assert set(event.prev_event_ids) <= sent, "a prev event was not sent first"
            sent.add(event.event_id)
    assert workload.summary.forks > 0 and workload.summary.merges > 0
    assert len(sent) == workload.summary.events_unique
