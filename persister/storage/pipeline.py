"""A lane's round trips, sent through libpq's pipeline mode directly.

A batch is two round trips (`persister.storage.events_txn`). Through
psycopg's cursors and pipelines each cost the persister more CPU than the
batch's own rows when the batch is small: cursor and result objects,
query conversion, a generator per wait. Measured on the same connection,
alternating batch by batch (`bench/README.md`, seventh session): 465 µs of
client CPU per single-event transaction through psycopg, 238 µs this way;
955 and 641 µs for 32 events. So the lane drives the connection's libpq
handle (`conn.pgconn`, psycopg's own binding) for these round trips, and
psycopg still does the rest: connecting, parsing result rows with the
connection's loaders, errors with their SQLSTATE, rollback.

A round trip sends its commands and a Sync in pipeline mode, then reads one
result per command. Any failure on the way leaves results unread on the
wire, so the connection is closed: the lane reconnects, and a COMMIT whose
answer is lost is settled as a lost connection (`psycopg.OperationalError`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import errors, pq
from psycopg.adapt import Transformer
from psycopg.pq.abc import PGconn, PGresult

from persister.storage import arrays

Connection = psycopg.AsyncConnection[Any]

_PLACEHOLDER = re.compile(r"%\((\w+)\)[sb]")
_BINARY, _TEXT = pq.Format.BINARY, pq.Format.TEXT
_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


class Early(NamedTuple):
    """A command of a round trip whose result is wanted as soon as it exists:
    the server is asked to flush its answers after it, and `heard` is given
    the result when it arrives, while the commands after it may still run."""

    command: int  # its index in the round trip
    heard: Callable[[PGresult], None]


class Statement(NamedTuple):
    """A statement prepared on every lane connection under `name`."""

    name: bytes
    sql: bytes  # with $1, $2... for the parameters, in the order of `params`
    params: tuple[str, ...]


class Command(NamedTuple):
    """One statement of a round trip, with its parameters encoded."""

    statement: Statement | None  # None: `sql` is sent and parsed as it is
    sql: bytes
    values: list[bytes | None]
    formats: list[pq.Format]


def statement(name: str, sql: str) -> Statement:
    """`sql` written with psycopg's named placeholders (`%(x)s`, `%(x)b`),
    rewritten with positional ones. Every placeholder must carry a cast
    (`%(x)s::bigint`): the server infers the parameters' types."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return Statement(name.encode(), _PLACEHOLDER.sub(number, sql).encode(), tuple(names))


def bind(prepared: Statement, params: Mapping[str, object]) -> Command:
    values: list[bytes | None] = []
    formats: list[pq.Format] = []
    for name in prepared.params:
        value, format = _encode(params[name])
        values.append(value)
        formats.append(format)
    return Command(prepared, prepared.sql, values, formats)


def plain(sql: str) -> Command:
    return Command(None, sql.encode(), [], [])


def _encode(value: object) -> tuple[bytes | None, pq.Format]:
    # Arrays in binary (one pass, persister.storage.arrays); scalars as text,
    # which the server parses by the type it inferred.
    if value is None:
        return None, _TEXT
    if isinstance(value, arrays.TextArray):
        return arrays.dump_text_array(value), _BINARY
    if isinstance(value, arrays.Int8Array):
        return arrays.dump_int8_array(value), _BINARY
    if isinstance(value, arrays.BoolArray):
        return arrays.dump_bool_array(value), _BINARY
    if isinstance(value, bool):
        return (b"t" if value else b"f"), _TEXT
    if isinstance(value, int | str):
        return str(value).encode(), _TEXT
    raise TypeError(f"no encoding for a parameter of type {type(value).__name__}")


async def prepare(conn: Connection, statements: Sequence[Statement]) -> None:
    """Prepare `statements` on `conn` (once per connection)."""
    pgconn = conn.pgconn
    _enter(pgconn)
    for prepared in statements:
        pgconn.send_prepare(prepared.name, prepared.sql)
    await _finish(conn, len(statements))


async def round_trip(
    conn: Connection, commands: Sequence[Command], early: Early | None = None
) -> list[PGresult]:
    """Send `commands` in one round trip; their results, in order. Raises the
    first error the server gave, as psycopg would.

    Without a flush request the server holds its answers until the Sync at
    the end; `early` names a command whose successful result is heard as
    soon as the server has it (the orderings of a batch sent in one round
    trip must be known before its COMMIT can land, `persister.writer.lane`).
    """
    pgconn = conn.pgconn
    _enter(pgconn)
    for index, command in enumerate(commands):
        if command.statement is None:
            pgconn.send_query_params(command.sql, None)
        else:
            pgconn.send_query_prepared(command.statement.name, command.values, command.formats)
        if early is not None and index == early.command:
            pgconn.send_flush_request()
    return await _finish(conn, len(commands), early)


def rows(conn: Connection, result: PGresult) -> list[tuple[Any, ...]]:
    """A result's rows, as tuples of Python values (psycopg's loaders)."""
    loader = Transformer(conn)
    loader.set_pgresult(result)
    return loader.load_rows(0, result.ntuples, tuple)


def _enter(pgconn: PGconn) -> None:
    if pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError("the connection is closed")
    # psycopg's async connections are non-blocking, as pipeline mode needs.
    pgconn.enter_pipeline_mode()


async def _finish(conn: Connection, expected: int, early: Early | None = None) -> list[PGresult]:
    pgconn = conn.pgconn
    try:
        pgconn.pipeline_sync()
        while pgconn.flush():
            # The server may be answering while we still send (a big batch):
            # read as well, or both sides could wait on full buffers.
            await _wait(pgconn, write=True)
            pgconn.consume_input()
        results = await _read_until_sync(pgconn, early)
        pgconn.exit_pipeline_mode()
    except BaseException:
        pgconn.finish()
        raise
    for result in results:
        if result.status not in _OK:
            raise _error(conn, result)
    if len(results) != expected:
        pgconn.finish()
        raise psycopg.InterfaceError(f"{len(results)} results for {expected} commands")
    return results


async def _read_until_sync(pgconn: PGconn, early: Early | None) -> list[PGresult]:
    results: list[PGresult] = []
    while True:
        while pgconn.is_busy():
            await _wait(pgconn, write=False)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:  # the end of one command's results
            continue
        if result.status == pq.ExecStatus.PIPELINE_SYNC:
            return results
        if early is not None and len(results) == early.command and result.status in _OK:
            early.heard(result)
        results.append(result)


async def _wait(pgconn: PGconn, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = pgconn.socket
    loop.add_reader(fd, wake)
    if write:
        loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
        if write:
            loop.remove_writer(fd)


def _error(conn: Connection, result: PGresult) -> psycopg.Error:
    if conn.pgconn.status != pq.ConnStatus.OK:
        return psycopg.OperationalError(result.get_error_message() or "connection lost")
    if result.status == pq.ExecStatus.PIPELINE_ABORTED:  # follows the error, never alone
        return psycopg.InternalError("a pipeline was aborted without an error")
    return errors.error_from_result(result, encoding=conn.info.encoding)
