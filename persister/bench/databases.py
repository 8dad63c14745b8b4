"""Fresh, throw-away databases for benchmark runs, on the configured server."""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from persister.storage.migrate import MAINTENANCE_DB, migrate, with_database

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def bench_database_name(suffix: str = "") -> str:
    # Milliseconds keep two runs started in the same second apart.
    return f"persister_bench_{int(time.time() * 1000)}{suffix}"


async def create_database(server_url: str, name: str) -> str:
    """Create and migrate database `name`; return its URL."""
    url = with_database(server_url, name)
    await migrate(url)
    return url


async def drop_database(server_url: str, name: str) -> None:
    """Drop a benchmark database, closing whatever still uses it."""
    if not name.startswith("persister_bench_"):
        raise ValueError(f"refusing to drop {name!r}: not a benchmark database")
    async with await psycopg.AsyncConnection.connect(
        with_database(server_url, MAINTENANCE_DB), autocommit=True
    ) as conn:
        await conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
