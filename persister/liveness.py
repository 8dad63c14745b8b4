"""Dead writers must not hold readers back, and must not commit late.

Readers take the minimum of every writer's announced position, so a writer
that stops announcing (SIGKILL, crash, partition) stalls them all. Announcing
on its behalf is only safe when it can no longer commit an ordering at or
below the announced position. This module makes that so, with three
PostgreSQL advisory locks per writer W, keyed (namespace, W's instance_id):

LIVENESS(W)  session lock, held by W's process on a dedicated connection for
             as long as it runs. PostgreSQL drops it when that connection
             dies, which for a killed process is at once (the kernel closes
             the socket).
FENCE(W)     every write transaction of W begins with `fence_check_txn`,
             which takes FENCE(W) shared until the transaction ends, *before*
             drawing any ordering. Whoever holds it exclusively therefore
             knows that no transaction of W is between its fence check and
             its end, and no new one gets past the check.
DEPUTY(W)    a try-lock so that one peer at a time announces for W.

and one number, `stream_writer_ids.epoch`, raised each time a process takes
over an instance (`hold_liveness`). `fence_check_txn` compares it *after*
taking the lock, so a transaction of an older process cannot commit once a
successor has started, even if that older process is still running.

Announcing for a dead writer W (`announce_for_dead_writers`, run by every
live writer every 0.5 s, and every 0.05 s by the one that announced for W
last, while W stays dead):

1. W's LIVENESS is not held by anyone (read from pg_locks, not taken).
2. In one transaction: take DEPUTY(W) or skip W; take FENCE(W) exclusively,
   waiting briefly; if W's transactions still hold it (a dead client's
   backend that has not noticed yet, or a frozen process), terminate those
   backends and take it. Then read the sequence's last value L and W's
   stored position R, read W's events in (R, L], store L as W's position,
   commit (which releases FENCE(W)).
3. Publish RDATA(instance=W, prev=R, pos=L, rows) on W's behalf.

Why it is true: while FENCE(W) was held, every transaction of W that ever
got past its fence check had ended, so its rows <= L are committed and were
read in step 2; every later transaction of W gets past the check after the
release and only then draws orderings, which are above L. So the promise
holds even if W was not dead after all (its liveness connection alone
dropped): announcing is safe for a live writer, it only costs it a few
milliseconds of waiting. Nothing is held between rounds, so there is nothing
to hand back when W returns: W's own start (`hold_liveness`, then
`persister.storage.streams.recover_position`) reads the sequence again.

What the writer calls, and when:

    startup:  liveness = Liveness(database_url, instance)
              await liveness.acquire()          # before recover_position
              start = await recover_position(conn, instance)
    each write transaction, first statement:
              await fence_check_txn(cur, instance, liveness.epoch)
    every second:  await liveness.check()       # re-takes a dropped lock
    every 0.5 s (0.05 s after a round that announced for someone):
                   await announce_for_dead_writers(conn, publisher, writers,
                                                   self_instance=instance)
    after a connection error *during COMMIT*, before finishing its orderings:
              await settle_lost_connection(other_conn, backend_pid)

`FencedOut` from `fence_check_txn` or `Liveness.check` means another process
now runs this instance: stop writing and exit.

Operators: ending another writer's transactions needs pg_terminate_backend,
so all persisters must connect as the same database role (or one granted
pg_signal_backend). Otherwise a frozen writer stalls readers until
PostgreSQL notices it (idle_in_transaction_session_timeout bounds that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection, AsyncCursor
from psycopg.errors import LockNotAvailable

from persister.errors import PersisterError
from persister.replication.messages import (
    EVENTS_STREAM,
    Command,
    position_command,
    rdata_command,
)
from persister.replication.publisher import Publisher
from persister.storage.streams import (
    ensure_instance_ids,
    read_sequence_position,
    read_stream_position,
    rows_between,
    upsert_stream_position_txn,
)

logger = logging.getLogger(__name__)

# Advisory-lock namespaces (the first int4 key), "pw" + 1..3 in ASCII-ish
# hex, so they are recognisable in pg_locks.classid.
LIVENESS_NS: Final = 0x70770001
FENCE_NS: Final = 0x70770002
DEPUTY_NS: Final = 0x70770003

FENCED_OUT: Final = "PS001"  # SQLSTATEs raised by stream_writer_fence (migration 0002)
UNKNOWN_WRITER: Final = "PS002"

# A peer first waits this long for the dead writer's transactions to end by
# themselves, then ends them; the budget for a stalled reader is 2 s.
FENCE_PATIENCE_MS: Final = 250
FENCE_AFTER_TERMINATE_MS: Final = 1000
TERMINATE_WAIT_MS: Final = 1000
RELAY_ROWS_LIMIT: Final = 1000

_THIS_DATABASE: Final = "(SELECT oid FROM pg_database WHERE datname = current_database())"

SELECT_DEAD_WRITERS: Final = f"""
    SELECT w.instance_name FROM stream_writer_ids w
    WHERE w.instance_name = ANY(%s) AND w.instance_name <> %s
      AND NOT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.database = {_THIS_DATABASE}
          AND l.classid = %s::int::oid AND l.objid = w.instance_id::oid
          AND l.objsubid = 2 AND l.granted)
    ORDER BY w.instance_name
"""

SELECT_LIVENESS_HELD: Final = f"""
    SELECT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.database = {_THIS_DATABASE}
          AND l.classid = %s::int::oid AND l.objid = %s::oid AND l.objsubid = 2 AND l.granted)
"""

SELECT_LIVENESS_HELD_HERE: Final = f"""
    SELECT EXISTS (
        SELECT 1 FROM pg_locks l JOIN stream_writer_ids w ON l.objid = w.instance_id::oid
        WHERE w.instance_name = %s AND l.locktype = 'advisory'
          AND l.database = {_THIS_DATABASE} AND l.classid = %s::int::oid
          AND l.objsubid = 2 AND l.granted AND l.pid = pg_backend_pid())
"""

# Only ShareLock holders: those are the writer's own transactions. A peer
# holding the fence exclusively lets go by itself within a lock timeout.
TERMINATE_FENCE_HOLDERS: Final = f"""
    SELECT count(*) FILTER (WHERE pg_terminate_backend(l.pid, %s)) FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.database = {_THIS_DATABASE}
      AND l.classid = %s::int::oid AND l.objid = %s::oid AND l.objsubid = 2
      AND l.mode = 'ShareLock' AND l.granted AND l.pid <> pg_backend_pid()
"""

RAISE_EPOCH: Final = """
    UPDATE stream_writer_ids SET epoch = epoch + 1 WHERE instance_id = %s RETURNING epoch
"""

SELECT_EPOCH: Final = "SELECT epoch FROM stream_writer_ids WHERE instance_name = %s"

SELECT_BACKEND_EXISTS: Final = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)"


class InstanceAlreadyRunning(PersisterError):
    """Another live process holds this instance's liveness lock."""


class FencedOut(PersisterError):
    """A newer process took over this instance; this one must stop writing."""


class BackendStillRunning(PersisterError):
    """A lost connection's backend has not ended yet: its COMMIT may still land."""


async def fence_check_txn(cur: AsyncCursor[Any], instance: str, epoch: int) -> None:
    """First statement of every write transaction, before drawing orderings."""
    try:
        await cur.execute("SELECT stream_writer_fence(%s, %s, %s)", (FENCE_NS, instance, epoch))
    except psycopg.Error as exc:
        if exc.sqlstate == FENCED_OUT:
            raise FencedOut(f"instance {instance}: epoch {epoch} is no longer current") from exc
        if exc.sqlstate == UNKNOWN_WRITER:
            raise PersisterError(f"instance {instance} never took its liveness lock") from exc
        raise


async def hold_liveness(conn: AsyncConnection[Any], instance: str, *, wait_s: float = 5.0) -> int:
    """Take over `instance` on this dedicated autocommit connection; returns the epoch.

    Waits up to `wait_s` for the liveness lock (a killed predecessor's
    connection may take a moment to go), then ends whatever transactions a
    previous process of this instance left behind and raises the epoch, so
    none of them can commit from now on.
    """
    instance_id = (await ensure_instance_ids(conn, [instance]))[instance]
    await _take_liveness_lock(conn, instance, instance_id, wait_s)
    epoch = await _take_over(conn, instance, instance_id, wait_s)
    logger.info("instance %s: took over as epoch %d", instance, epoch)
    return epoch


async def liveness_held(conn: AsyncConnection[Any], instance: str) -> bool:
    """Whether this connection holds `instance`'s liveness lock."""
    cur = await conn.execute(SELECT_LIVENESS_HELD_HERE, (instance, LIVENESS_NS))
    row = await cur.fetchone()
    return bool(row and row[0])


async def dead_writers(
    conn: AsyncConnection[Any], writers: Sequence[str], self_instance: str | None = None
) -> list[str]:
    """Writers of the pool that no process holds the liveness lock for."""
    await ensure_instance_ids(conn, writers)
    return await _select_dead(conn, writers, self_instance)


async def _select_dead(
    conn: AsyncConnection[Any], writers: Sequence[str], self_instance: str | None
) -> list[str]:
    cur = await conn.execute(SELECT_DEAD_WRITERS, (list(writers), self_instance or "", LIVENESS_NS))
    return [str(name) for (name,) in await cur.fetchall()]


async def announce_for_dead_writers(
    conn: AsyncConnection[Any],
    publisher: Publisher,
    writers: Sequence[str],
    *,
    self_instance: str | None = None,
) -> list[str]:
    """One round of the protocol above; returns the writers announced for.

    `conn`: an autocommit connection of the caller's (not the liveness one).
    `publisher`: the caller's own; it relays in the dead writer's name.
    """
    ids = await ensure_instance_ids(conn, writers)
    announced = []
    for writer in await _select_dead(conn, writers, self_instance):
        command = await _fenced_announcement(conn, writer, ids[writer])
        if command is not None:
            await publisher.relay(command)
            announced.append(writer)
    return announced


async def settle_lost_connection(
    conn: AsyncConnection[Any], backend_pid: int, timeout_s: float = 5.0
) -> None:
    """Make sure the backend of a connection lost during COMMIT is gone.

    The server may still be committing when the client sees the error; the
    orderings of that transaction may be marked finished only once its
    outcome is final. Terminating waits for a commit in progress to end.
    `pg_terminate_backend` answers false both for "no such backend" and for
    "still there after the timeout", so the backend's absence is checked
    afterwards: `BackendStillRunning` means not settled yet, ask again.
    """
    await conn.execute("SELECT pg_terminate_backend(%s, %s)", (backend_pid, int(timeout_s * 1000)))
    cur = await conn.execute(SELECT_BACKEND_EXISTS, (backend_pid,))
    row = await cur.fetchone()
    if row and row[0]:
        raise BackendStillRunning(f"backend {backend_pid} did not end within {timeout_s} s")


class Liveness:
    """A writer's hold on its instance: the lock connection and the epoch."""

    def __init__(self, database_url: str, instance: str) -> None:
        self.instance = instance
        self._database_url = database_url
        self._conn: AsyncConnection[Any] | None = None
        self.epoch: int | None = None

    async def acquire(self, wait_s: float = 5.0) -> int:
        self._conn = await AsyncConnection.connect(self._database_url, autocommit=True)
        try:
            self.epoch = await hold_liveness(self._conn, self.instance, wait_s=wait_s)
        except BaseException:
            await self.close()
            raise
        return self.epoch

    async def check(self, wait_s: float = 5.0) -> None:
        """Re-take the lock if its connection dropped. Raises FencedOut if
        another process took the instance over meanwhile."""
        assert self.epoch is not None, "acquire() first"
        if await self._still_held():
            return
        logger.warning(
            "instance %s: liveness connection lost; taking the lock again", self.instance
        )
        await self._drop()
        conn = await AsyncConnection.connect(self._database_url, autocommit=True)
        self._conn = conn
        instance_id = (await ensure_instance_ids(conn, [self.instance]))[self.instance]
        try:
            await _take_liveness_lock(conn, self.instance, instance_id, wait_s)
        except InstanceAlreadyRunning as exc:
            raise FencedOut(str(exc)) from exc
        current = await _read_epoch(conn, self.instance)
        if current != self.epoch:
            raise FencedOut(f"instance {self.instance}: epoch {self.epoch} replaced by {current}")

    async def close(self) -> None:
        await self._drop()

    async def _still_held(self) -> bool:
        if self._conn is None or self._conn.closed:
            return False
        try:
            return await liveness_held(self._conn, self.instance)
        except psycopg.OperationalError:
            return False

    async def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
            self._conn = None


async def _take_liveness_lock(
    conn: AsyncConnection[Any], instance: str, instance_id: int, wait_s: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LIVENESS_NS, instance_id))
        row = await cur.fetchone()
        if row and row[0]:
            return
        if loop.time() >= deadline:
            raise InstanceAlreadyRunning(f"instance {instance} is already running elsewhere")
        await asyncio.sleep(0.1)


async def _take_over(
    conn: AsyncConnection[Any], instance: str, instance_id: int, wait_s: float
) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            async with conn.transaction():
                await _lock_fence(conn, instance_id, FENCE_PATIENCE_MS)
                return await _raise_epoch(conn, instance_id)
        except LockNotAvailable:
            if loop.time() >= deadline:
                raise InstanceAlreadyRunning(
                    f"instance {instance}: transactions of a previous process hold its fence"
                ) from None
        # We hold the liveness lock, so ShareLock holders belong to a
        # process that no longer does: a straggler.
        ended = await _end_fence_holders(conn, instance_id)
        logger.warning("instance %s: ended %d transactions of a previous process", instance, ended)


async def _lock_fence(conn: AsyncConnection[Any], instance_id: int, wait_ms: int) -> None:
    await conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{wait_ms}ms",))
    await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (FENCE_NS, instance_id))
    # The rest of the transaction is short; do not let it wait on row locks forever.
    await conn.execute("SELECT set_config('lock_timeout', '2s', true)")


async def _end_fence_holders(conn: AsyncConnection[Any], instance_id: int) -> int:
    cur = await conn.execute(TERMINATE_FENCE_HOLDERS, (TERMINATE_WAIT_MS, FENCE_NS, instance_id))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _is_live(conn: AsyncConnection[Any], instance_id: int) -> bool:
    cur = await conn.execute(SELECT_LIVENESS_HELD, (LIVENESS_NS, instance_id))
    row = await cur.fetchone()
    return bool(row and row[0])


async def _raise_epoch(conn: AsyncConnection[Any], instance_id: int) -> int:
    cur = await conn.execute(RAISE_EPOCH, (instance_id,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _read_epoch(conn: AsyncConnection[Any], instance: str) -> int:
    cur = await conn.execute(SELECT_EPOCH, (instance,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _fenced_announcement(
    conn: AsyncConnection[Any], writer: str, instance_id: int
) -> Command | None:
    """Steps 2 of the protocol for one dead writer; None if it is not our turn."""
    try:
        return await _announcement_txn(conn, writer, instance_id, FENCE_PATIENCE_MS)
    except LockNotAvailable:
        pass
    # Its transactions did not end by themselves: a killed client whose
    # backend has not noticed, or a frozen process. End them, unless the
    # writer came back meanwhile (then they are its live transactions).
    if await _is_live(conn, instance_id):
        return None
    ended = await _end_fence_holders(conn, instance_id)
    logger.warning("dead writer %s: ended %d of its transactions", writer, ended)
    try:
        return await _announcement_txn(conn, writer, instance_id, FENCE_AFTER_TERMINATE_MS)
    except LockNotAvailable:
        logger.warning("dead writer %s: its fence is still held; next round", writer)
        return None


async def _announcement_txn(
    conn: AsyncConnection[Any], writer: str, instance_id: int, wait_ms: int
) -> Command | None:
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, %s)", (DEPUTY_NS, instance_id)
        )
        deputy = await cur.fetchone()
        if not (deputy and deputy[0]):
            return None  # another peer is announcing for it right now
        await _lock_fence(conn, instance_id, wait_ms)
        if await _is_live(conn, instance_id):
            return None  # it came back while we waited; it announces itself
        return await _relay_command_txn(conn, writer)


async def _relay_command_txn(conn: AsyncConnection[Any], writer: str) -> Command:
    """What the dead writer would announce; call holding its fence."""
    sequence = await read_sequence_position(conn)
    stored = await read_stream_position(conn, writer)
    async with conn.cursor() as cur:
        if stored is None:
            # It never wrote its row, so it never drew an ordering.
            await upsert_stream_position_txn(cur, EVENTS_STREAM, writer, sequence)
            return position_command(writer, sequence, sequence)
        pos = max(sequence, stored)
        rows, limited = await rows_between(conn, stored, pos, RELAY_ROWS_LIMIT, instance=writer)
        if limited:
            pos = rows[-1].stream_ordering  # a lower promise is just as true
        if pos != stored:
            # Unchanged, it is announced again but not written: a round every
            # DEAD_WRITER_FOLLOW_S then costs no WAL flush.
            await upsert_stream_position_txn(cur, EVENTS_STREAM, writer, pos)
    if rows:
        return rdata_command(writer, stored, pos, tuple(rows))
    return position_command(writer, stored, pos)
