"""Bring a database to the current schema by applying `migrations/NNNN_*.sql`.

Contract section 1: `migrate` must work on an empty or older database, be safe
to run from several processes at once, and be safe to run again. So:

- the database itself is created when missing (from the `postgres`
  maintenance database, under an advisory lock there, because two processes
  racing on CREATE DATABASE would otherwise make one of them fail), in UTF-8
  with the C collation, as Synapse requires of its own database: every
  comparison in the DAG tables' text indexes is then a byte comparison
  instead of the C library's `strcoll` (10 % less PostgreSQL CPU per event
  for single-event transactions, `bench/README.md`); an existing database
  in another encoding is refused, and one with another collation gets a
  warning;
- every migration runs in its own transaction together with the row that
  records it in `schema_migrations`, so a failed migration leaves no trace and
  a crash between two migrations resumes at the next one;
- the whole run holds a session advisory lock in the target database, so
  concurrent runs apply each migration exactly once: the later ones wait,
  then find nothing left to do.

A migration file must therefore be valid inside a transaction (no
`CREATE INDEX CONCURRENTLY`, no `VACUUM`).

Where the files are found, first hit wins:
1. `PERSISTER_MIGRATIONS_DIR`, if set;
2. `<repo>/migrations`, the repository root being the parent of the
   `persister` package (a checkout or an editable install);
3. `<sys.prefix>/share/persister/migrations`, where a wheel's `data-files`
   puts them in a regular install.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from persister.errors import PersisterError

logger = logging.getLogger(__name__)

MAINTENANCE_DB = "postgres"
# Any fixed 64-bit number works; this one spells "persist" in ASCII so that it
# is recognisable in pg_locks.objid and unlikely to clash with other apps.
MIGRATE_LOCK_KEY = 0x70657273697374

_FILE_NAME = re.compile(r"^(\d{4,})_\w+\.sql$")

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INT PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


# What Synapse's documentation asks of its database, for the same reasons:
# UTF-8 text, and IDs compared byte by byte. template0, because another
# template's locale cannot be changed on the way.
CREATE_DATABASE = (
    "CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
)
SELECT_LOCALE = """
SELECT datname, pg_encoding_to_char(encoding), datcollate
FROM pg_database WHERE datname = current_database()
"""


class MigrationError(PersisterError):
    """The migrations cannot run: their folder is missing or inconsistent,
    the database URL names no database, or the database is not UTF-8."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def find_migrations_dir() -> Path:
    """The folder of migration files, by the search order of the module doc."""
    candidates: list[Path] = []
    if override := os.environ.get("PERSISTER_MIGRATIONS_DIR"):
        candidates.append(Path(override))
    candidates.append(Path(__file__).resolve().parents[2] / "migrations")
    candidates.append(Path(sys.prefix) / "share" / "persister" / "migrations")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise MigrationError(f"no migrations folder; looked in {', '.join(map(str, candidates))}")


def load_migrations(folder: Path) -> list[Migration]:
    """The migration files of `folder` in version order; other files are ignored."""
    found: dict[int, Migration] = {}
    for path in folder.iterdir():
        match = _FILE_NAME.match(path.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"two migrations numbered {version}: {found[version].name}, {path.name}"
            )
        found[version] = Migration(version, path.name, path)
    return [found[v] for v in sorted(found)]


def database_name(database_url: str) -> str:
    name = conninfo_to_dict(database_url).get("dbname")
    if not name:
        # Not the URL itself: it may hold a password.
        raise MigrationError("database.url names no database (postgresql://host:port/NAME)")
    return str(name)


def with_database(database_url: str, dbname: str) -> str:
    """The same server and credentials, another database; URLs stay URLs."""
    parts = urllib.parse.urlsplit(database_url)
    if parts.scheme in ("postgresql", "postgres"):
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname)))
    return make_conninfo(database_url, dbname=dbname)


async def migrate(database_url: str, migrations_dir: Path | None = None) -> list[str]:
    """Create the database if needed, apply pending migrations; return their names."""
    migrations = load_migrations(migrations_dir or find_migrations_dir())
    await ensure_database(database_url)
    applied: list[str] = []
    async with (
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
        _advisory_lock(conn),
    ):
        await _check_locale(conn)
        await conn.execute(CREATE_LEDGER)
        done = await _applied_versions(conn)
        for migration in migrations:
            if migration.version not in done:
                await _apply(conn, migration)
                applied.append(migration.name)
    return applied


async def ensure_database(database_url: str) -> None:
    """CREATE DATABASE unless it exists, serialised through the maintenance DB."""
    dbname = database_name(database_url)
    try:
        maintenance = await psycopg.AsyncConnection.connect(
            with_database(database_url, MAINTENANCE_DB), autocommit=True
        )
    except psycopg.OperationalError:
        # No access to the maintenance database (a restricted operator role):
        # the target must then exist already, and connecting to it says so.
        logger.debug("cannot reach the maintenance database; assuming %s exists", dbname)
        return
    async with maintenance, _advisory_lock(maintenance):
        cur = await maintenance.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if await cur.fetchone() is None:
            await maintenance.execute(sql.SQL(CREATE_DATABASE).format(sql.Identifier(dbname)))
            logger.info("created database %s", dbname)


async def _check_locale(conn: psycopg.AsyncConnection[TupleRow]) -> None:
    cur = await conn.execute(SELECT_LOCALE)
    row = await cur.fetchone()
    assert row is not None
    dbname, encoding, collation = row
    if encoding != "UTF8":
        raise MigrationError(
            f"database {dbname} has encoding {encoding}; events are UTF-8 text, so it must be "
            f"UTF8 (create it with: {CREATE_DATABASE.format(dbname)})"
        )
    if collation not in ("C", "POSIX"):
        logger.warning(
            "database %s has collation %s: every index comparison of an event or room ID "
            "goes through the C library (about 10%% more PostgreSQL CPU per event). "
            "Synapse requires C; a new database can be made so with: %s",
            dbname,
            collation,
            CREATE_DATABASE.format(dbname),
        )


@asynccontextmanager
async def _advisory_lock(conn: psycopg.AsyncConnection[TupleRow]) -> AsyncIterator[None]:
    # A session lock (not a transaction one) because each migration commits
    # on its own while the lock must span the whole run.
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK_KEY,))
    try:
        yield
    finally:
        if not conn.closed:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK_KEY,))


async def _applied_versions(conn: psycopg.AsyncConnection[TupleRow]) -> set[int]:
    cur = await conn.execute("SELECT version FROM schema_migrations")
    return {int(row[0]) for row in await cur.fetchall()}


async def _apply(conn: psycopg.AsyncConnection[TupleRow], migration: Migration) -> None:
    # Passed as bytes with no parameters, so psycopg uses the simple query
    # protocol, which allows several statements in one call.
    script = migration.path.read_bytes()
    async with conn.transaction():
        await conn.execute(script)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
    logger.info("applied migration %s", migration.name)


def main(argv: list[str] | None = None) -> int:
    """`python -m persister.storage.migrate [URL]`; URL defaults to $PERSISTER_DATABASE_URL."""
    args = sys.argv[1:] if argv is None else argv
    url = args[0] if args else os.environ.get("PERSISTER_DATABASE_URL")
    if not url:
        print("usage: python -m persister.storage.migrate DATABASE_URL", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        applied = asyncio.run(migrate(url))
    except (psycopg.Error, MigrationError) as exc:
        print(f"migrate failed: {exc}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
