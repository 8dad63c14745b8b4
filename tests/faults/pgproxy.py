"""A TCP relay in front of PostgreSQL that can lose the answer to a COMMIT.

`arm_lost_commit(refuse_s)`: the next COMMIT of a persister lane's
transaction that drew forward stream orderings (by a plain or a prepared
statement) is passed to the server, which commits it, but the lane's
connection is cut before the answer comes back, and for `refuse_s` seconds
the relay refuses new connections: from the persister's side the database
is unreachable just when it must find out whether that COMMIT landed. This
is the "settle after a lost COMMIT" path of `persister.writer.lane` made to
happen on purpose.

It reads just enough of the frontend protocol to find the COMMIT: the
startup packet (for application_name) and the typed messages after it. The
persister must connect with `sslmode=disable` and `gssencmode=disable` (see
`url`), so that the stream is plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

LANE_PREFIX = b"persister:"
DRAWS_ORDERINGS = b"nextval('events_stream_seq')"


class PgProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.fired = asyncio.Event()
        self.lost_commits = 0
        self._armed_refuse_s: float | None = None
        self._refuse_until = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, database: str) -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
            "?sslmode=disable&gssencmode=disable"
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def arm_lost_commit(self, refuse_s: float) -> None:
        self.fired.clear()
        self._armed_refuse_s = refuse_s

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        cut = asyncio.Event()
        upstream = asyncio.create_task(self._client_to_server(client_r, server_w, client_w, cut))
        downstream = asyncio.create_task(_relay_unless(server_r, client_w, cut))
        for task in (upstream, downstream):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Whichever side ends first ends the other; after a cut, the server
        # gets a moment to finish the COMMIT it was sent.
        await asyncio.wait((upstream, downstream), return_when=asyncio.FIRST_COMPLETED)
        if cut.is_set():
            await asyncio.sleep(1.0)
        for writer in (client_w, server_w):
            writer.close()
        for task in (upstream, downstream):
            task.cancel()
        await asyncio.gather(upstream, downstream, return_exceptions=True)

    async def _client_to_server(
        self,
        client_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
        client_w: asyncio.StreamWriter,
        cut: asyncio.Event,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            (length,) = struct.unpack("!i", await client_r.readexactly(4))
            startup = await client_r.readexactly(length - 4)
            server_w.write(struct.pack("!i", length) + startup)
            is_lane = _application_name(startup).startswith(LANE_PREFIX) and (
                b":" not in _application_name(startup)[len(LANE_PREFIX) :]
            )
            drew = committing = False
            drawing_statements: set[bytes] = set()  # prepared ones that draw
            while not client_r.at_eof():  # readexactly raises at the end anyway
                kind = await client_r.readexactly(1)
                (length,) = struct.unpack("!i", await client_r.readexactly(4))
                body = await client_r.readexactly(length - 4)
                drew = drew or _draws(kind, body, drawing_statements)
                server_w.write(kind + struct.pack("!i", length) + body)
                await server_w.drain()
                # A COMMIT comes as a simple query, or (in a pipeline) as a
                # Parse whose Execute runs at the next Sync at the latest.
                ending = _ends_transaction(kind, body)
                if ending == b"COMMIT" and kind == b"P":
                    committing = True
                    continue
                if ending == b"COMMIT" or (committing and kind == b"S"):
                    if is_lane and drew and self._armed_refuse_s:
                        self._lose_answer(client_w, cut)
                        return
                if ending is not None or (committing and kind == b"S"):
                    drew = committing = False

    def _lose_answer(self, client_w: asyncio.StreamWriter, cut: asyncio.Event) -> None:
        assert self._armed_refuse_s is not None
        cut.set()  # the server's answer is read and dropped
        client_w.transport.abort()
        self._refuse_until = time.monotonic() + self._armed_refuse_s
        self._armed_refuse_s = None
        self.lost_commits += 1
        self.fired.set()


async def _relay_unless(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: asyncio.Event
) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            if cut.is_set():
                continue
            writer.write(data)
            await writer.drain()


def _draws(kind: bytes, body: bytes, drawing_statements: set[bytes]) -> bool:
    """Whether this message runs a statement that draws stream orderings.

    The lanes prepare that statement (see `events_txn.prepare_connection`):
    its text comes once, in a Parse naming it; later transactions only Bind
    that name."""
    if kind == b"P":
        name, _, query = body.partition(b"\x00")
        if DRAWS_ORDERINGS in query:
            if name:
                drawing_statements.add(name)
            return True
        return False
    if kind == b"B":
        _portal, _, rest = body.partition(b"\x00")
        return rest.partition(b"\x00")[0] in drawing_statements
    return kind == b"Q" and DRAWS_ORDERINGS in body


def _ends_transaction(kind: bytes, body: bytes) -> bytes | None:
    """b"COMMIT" or b"ROLLBACK" for a simple query or a Parse (of the unnamed
    statement, as psycopg sends without prepared statements) of one."""
    if kind == b"Q":
        query = body
    elif kind == b"P" and body[:1] == b"\x00":
        query = body[1:]
    else:
        return None
    for command in (b"COMMIT", b"ROLLBACK"):
        if query[: len(command) + 1].upper() == command + b"\x00":
            return command
    return None


def _application_name(startup: bytes) -> bytes:
    # int32 protocol version, then NUL-terminated key/value pairs.
    fields = startup[4:].split(b"\x00")
    for key, value in zip(fields[::2], fields[1::2], strict=False):
        if key == b"application_name":
            return value
    return b""
