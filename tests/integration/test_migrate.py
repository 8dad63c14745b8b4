"""`migrate` on empty, current and older databases, alone and concurrently.

The catalog test also keeps schema/full.sql honest: it must describe exactly
what the migrations build.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from persister.storage.migrate import (
    MigrationError,
    database_name,
    ensure_database,
    find_migrations_dir,
    load_migrations,
    migrate,
)
from tests.fixtures.db import Maintenance

ROOT = Path(__file__).resolve().parents[2]
ALL_NAMES = [m.name for m in load_migrations(find_migrations_dir())]

# What two databases must share to have the same schema. `schema_migrations`
# is the migrator's own ledger, absent from the snapshot, so it is left out.
CATALOG_QUERIES = {
    "tables": """
        SELECT table_name, table_type FROM information_schema.tables
        WHERE table_schema = 'public' AND table_name <> 'schema_migrations'""",
    # Column order by rank, not ordinal_position: a dropped column leaves a gap.
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default,
               character_maximum_length, numeric_precision, numeric_scale,
               rank() OVER (PARTITION BY table_name ORDER BY ordinal_position)
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name <> 'schema_migrations'""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename <> 'schema_migrations'""",
    "constraints": """
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE k.connamespace = 'public'::regnamespace AND c.relname <> 'schema_migrations'""",
    "sequences": """
        SELECT sequence_name, data_type, start_value, minimum_value, maximum_value,
               increment, cycle_option
        FROM information_schema.sequences WHERE sequence_schema = 'public'""",
    "views": """
        SELECT table_name, view_definition FROM information_schema.views
        WHERE table_schema = 'public'""",
    "functions": """
        SELECT proname, pg_get_function_identity_arguments(oid), prosrc FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
        WHERE NOT tgisinternal""",
    "types": """
        SELECT t.typname, t.typtype, format_type(t.typbasetype, t.typtypmod),
               ARRAY(SELECT enumlabel FROM pg_enum WHERE enumtypid = t.oid
                     ORDER BY enumsortorder)
        FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd')""",
    "extensions": "SELECT extname FROM pg_extension",
}


async def catalog(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    snapshot: dict[str, list[tuple[object, ...]]] = {}
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for part, query in CATALOG_QUERIES.items():
            cur = await conn.execute(query)
            # repr as the sort key: rows mix None with values of other types.
            snapshot[part] = sorted(await cur.fetchall(), key=repr)
    return snapshot


async def applied_versions(database_url: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        return [row[0] for row in await cur.fetchall()]


async def table_exists(database_url: str, table: str) -> bool:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        row = await cur.fetchone()
        return bool(row and row[0])


def migrations_folder(tmp_path: Path, extra: dict[str, str], upto: int = 1) -> Path:
    """A migrations folder: the first `upto` real files plus `extra` ones."""
    folder = tmp_path / "migrations"
    folder.mkdir(parents=True, exist_ok=True)
    for migration in load_migrations(find_migrations_dir())[:upto]:
        shutil.copy(migration.path, folder / migration.name)
    for name, text in extra.items():
        (folder / name).write_text(text)
    return folder


async def test_migrate_creates_database_and_second_run_is_a_no_op(
    fresh_database_url: str,
) -> None:
    assert ALL_NAMES and ALL_NAMES[0].startswith("0001_")
    assert await migrate(fresh_database_url) == ALL_NAMES
    before = await catalog(fresh_database_url)
    assert await migrate(fresh_database_url) == []
    assert await catalog(fresh_database_url) == before
    assert len(await applied_versions(fresh_database_url)) == len(ALL_NAMES)


async def database_locale(database_url: str) -> tuple[str, str, str]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
            "WHERE datname = current_database()"
        )
        row = await cur.fetchone()
        assert row is not None
        return row


def create_database(maintenance: Maintenance, database_url: str, options: str) -> None:
    maintenance.execute(
        sql.SQL("CREATE DATABASE {} " + options).format(sql.Identifier(database_name(database_url)))
    )


async def test_a_database_migrate_creates_is_utf8_and_compares_text_by_bytes(
    fresh_database_url: str,
) -> None:
    await migrate(fresh_database_url)
    assert await database_locale(fresh_database_url) == ("UTF8", "C", "C")


async def test_an_existing_database_not_in_utf8_is_refused_and_left_untouched(
    fresh_database_url: str, maintenance: Maintenance
) -> None:
    create_database(
        maintenance, fresh_database_url, "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0",
    )  # fmt: skip
    with pytest.raises(MigrationError, match="has encoding LATIN1.*must be UTF8"):
        await migrate(fresh_database_url)
    assert not await table_exists(fresh_database_url, "schema_migrations")


async def test_an_existing_database_with_a_language_collation_is_migrated_with_a_warning(
    fresh_database_url: str, maintenance: Maintenance, caplog: pytest.LogCaptureFixture
) -> None:
    row = maintenance.execute(
        "SELECT collcollate FROM pg_collation WHERE collprovider = 'c' "
        "AND collcollate NOT IN ('C', 'POSIX') AND collencoding IN (-1, 6) "
        "ORDER BY collcollate LIMIT 1"
    ).fetchone()
    if row is None:
        pytest.skip("this server knows no libc collation but C")
    (collation,) = row
    create_database(
        maintenance,
        fresh_database_url,
        f"ENCODING 'UTF8' LC_COLLATE '{collation}' LC_CTYPE '{collation}' TEMPLATE template0",
    )
    with caplog.at_level(logging.WARNING, logger="persister.storage.migrate"):
        assert await migrate(fresh_database_url) == ALL_NAMES
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"has collation {collation}" in warnings[0], warnings


async def test_concurrent_migrates_apply_each_migration_once(fresh_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_database_url) for _ in range(4)))
    assert sorted(name for names in results for name in names) == ALL_NAMES
    assert sum(1 for names in results if names) == 1
    assert await applied_versions(fresh_database_url) == [
        m.version for m in load_migrations(find_migrations_dir())
    ]


async def test_concurrent_migrate_processes(fresh_database_url: str) -> None:
    """As the contract says it: several `migrate` processes at once."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "persister.storage.migrate", fresh_database_url, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(4)
    ]  # fmt: skip
    outputs = [(await proc.communicate())[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, outputs
    assert sum(f"applied {len(ALL_NAMES)} migration(s)" in out for out in outputs) == 1, outputs
    assert len(await applied_versions(fresh_database_url)) == len(ALL_NAMES)


async def test_full_schema_snapshot_matches_migrations(
    fresh_database_url: str, database_url: str
) -> None:
    # database_url is a clone of the migrated template; the fresh one gets the snapshot.
    await ensure_database(fresh_database_url)
    async with await psycopg.AsyncConnection.connect(fresh_database_url) as conn:
        await conn.execute((ROOT / "schema" / "full.sql").read_bytes())
    snapshot, migrated = await catalog(fresh_database_url), await catalog(database_url)
    assert snapshot["tables"], "schema/full.sql created no table"
    for part in CATALOG_QUERIES:
        assert snapshot[part] == migrated[part], f"schema/full.sql is stale: {part} differ"


async def test_older_database_gets_only_the_newer_migrations(
    fresh_database_url: str, tmp_path: Path
) -> None:
    only_first = migrations_folder(tmp_path / "old", {})
    assert await migrate(fresh_database_url, only_first) == ALL_NAMES[:1]
    assert await migrate(fresh_database_url) == ALL_NAMES[1:]
    # The folder above may hold a single migration today; this makes sure the
    # "apply the rest" path runs whatever the real folder holds.
    newer = migrations_folder(
        tmp_path / "new",
        {"9998_extra.sql": "CREATE TABLE extra (id INT);", "9999_more.sql": "SELECT 1;"},
        upto=len(ALL_NAMES),
    )
    assert await migrate(fresh_database_url, newer) == ["9998_extra.sql", "9999_more.sql"]
    assert await table_exists(fresh_database_url, "extra")


async def test_failed_migration_leaves_no_trace(fresh_database_url: str, tmp_path: Path) -> None:
    broken = "CREATE TABLE half_done (id INT); SELECT 1 / 0;"
    folder = migrations_folder(tmp_path, {"9999_broken.sql": broken}, upto=len(ALL_NAMES))
    with pytest.raises(psycopg.errors.DivisionByZero):
        await migrate(fresh_database_url, folder)
    # Earlier migrations stay applied; the broken one is rolled back whole.
    assert len(await applied_versions(fresh_database_url)) == len(ALL_NAMES)
    assert not await table_exists(fresh_database_url, "half_done")
    (folder / "9999_broken.sql").write_text("CREATE TABLE half_done (id INT);")
    assert await migrate(fresh_database_url, folder) == ["9999_broken.sql"]


def test_duplicate_migration_numbers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0001_b.sql").write_text("")
    with pytest.raises(MigrationError, match="two migrations numbered 1"):
        load_migrations(tmp_path)
