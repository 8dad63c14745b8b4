"""`persister status`: how far each writer of the pool has got, at a glance.

Each instance is asked twice, `interval_s` apart, for its status JSON
(`GET /_persist/v1/status`, shape `InstanceStatusBody`); events/s is the
growth of its `events_persisted` counter between the two answers. An
instance that does not answer still gets a row: its last position stored in
`stream_positions`, because a stopped writer is exactly the one that holds
the stream's "complete up to" point back (contract section 6).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import aiohttp
import msgspec
import psycopg

from persister.config import Config, InstanceLocation

logger = logging.getLogger(__name__)

STATUS_PATH = "/_persist/v1/status"
HEALTH_PATH = "/health"


class InstanceStatusBody(msgspec.Struct, frozen=True):
    """What `GET /_persist/v1/status` answers (served by `persister run`)."""

    instance: str
    # The last position announced on the events stream.
    position: int
    # Events accepted and not yet committed.
    queued_events: int
    rooms_owned: int
    # Events committed since the process started (duplicates excluded).
    events_persisted: int
    # The shared stream sequence's last value, as this instance last saw it.
    sequence: int


class StoredPositions(msgspec.Struct, frozen=True):
    positions: dict[str, int]
    sequence: int | None


class InstanceStatus(msgspec.Struct, frozen=True):
    instance: str
    address: str
    # GET /health answered 200: the instance accepts writes.
    reachable: bool
    position: int | None = None
    # "live": from the instance; "stored": from stream_positions.
    position_source: Literal["live", "stored"] | None = None
    sequence: int | None = None
    lag: int | None = None
    queued_events: int | None = None
    rooms_owned: int | None = None
    events_per_s: float | None = None
    error: str | None = None


PositionsSource = Callable[[Config], Awaitable[StoredPositions]]

_status_decoder = msgspec.json.Decoder(InstanceStatusBody)

# Contract section 5 fixes this table and its columns.
SELECT_POSITIONS = (
    "SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = 'events'"
)
# is_called is false until the first nextval(): then nothing was drawn yet.
SELECT_SEQUENCE = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_stream_seq"


async def read_stored_positions(config: Config) -> StoredPositions:
    """Positions and the sequence as the database has them (read-only)."""
    async with await psycopg.AsyncConnection.connect(
        config.database.conninfo(), autocommit=True
    ) as conn:
        rows = await (await conn.execute(SELECT_POSITIONS)).fetchall()
        sequence_row = await (await conn.execute(SELECT_SEQUENCE)).fetchone()
    sequence = None if sequence_row is None else int(sequence_row[0])
    return StoredPositions({str(name): int(pos) for name, pos in rows}, sequence)


class _Sample(msgspec.Struct, frozen=True):
    at: float
    body: InstanceStatusBody | None = None
    error: str | None = None


class _Probe:
    """Asks one instance for its health and status."""

    def __init__(
        self, http: aiohttp.ClientSession, name: str, location: InstanceLocation, secret: str
    ) -> None:
        self.name = name
        self.address = f"{location.host}:{location.port}"
        netloc = f"[{location.host}]" if ":" in location.host else location.host
        self._base = f"http://{netloc}:{location.port}"
        self._http = http
        self._headers = {"Authorization": f"Bearer {secret}"}

    async def healthy(self) -> tuple[bool, str | None]:
        try:
            async with self._http.get(self._base + HEALTH_PATH) as answer:
                await answer.read()
                if answer.status == 200:
                    return True, None
                return False, f"/health answered {answer.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, _describe(exc)

    async def sample(self) -> _Sample:
        try:
            async with self._http.get(self._base + STATUS_PATH, headers=self._headers) as answer:
                payload = await answer.read()
                at = asyncio.get_running_loop().time()
                if answer.status != 200:
                    return _Sample(at, error=f"{STATUS_PATH} answered {answer.status}")
                return _Sample(at, body=_status_decoder.decode(payload))
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
            return _Sample(asyncio.get_running_loop().time(), error=_describe(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timeout)"
    return str(exc) or type(exc).__name__


async def gather_status(
    config: Config,
    *,
    interval_s: float = 1.0,
    timeout_s: float = 2.0,
    database: PositionsSource | None = read_stored_positions,
) -> list[InstanceStatus]:
    """One status per instance of `stream_writers.events`, in shard order.

    `database=None` skips `stream_positions`; rows of silent instances then
    carry only their error.
    """
    stored_task = asyncio.create_task(_stored(config, database))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        probes = [
            _Probe(http, name, config.location(name), config.secret())
            for name in config.stream_writers.events
        ]
        health = await asyncio.gather(*(p.healthy() for p in probes))
        first = await asyncio.gather(*(p.sample() for p in probes))
        second = await _second_samples(probes, first, interval_s)
    stored, db_error = await stored_task
    rows = [
        _row(p, ok, why, a, b, stored, db_error)
        for p, (ok, why), a, b in zip(probes, health, first, second, strict=True)
    ]
    return _with_lag(rows, stored)


async def _second_samples(
    probes: Sequence[_Probe], first: Sequence[_Sample], interval_s: float
) -> list[_Sample | None]:
    if interval_s <= 0 or all(s.body is None for s in first):
        return [None] * len(probes)
    await asyncio.sleep(interval_s)

    async def again(probe: _Probe, before: _Sample) -> _Sample | None:
        return None if before.body is None else await probe.sample()

    return list(await asyncio.gather(*(again(p, s) for p, s in zip(probes, first, strict=True))))


async def _stored(
    config: Config, database: PositionsSource | None
) -> tuple[StoredPositions | None, str | None]:
    if database is None:
        return None, None
    try:
        return await database(config), None
    except (psycopg.Error, OSError) as exc:
        logger.warning("cannot read stream_positions: %s", exc)
        return None, f"database: {exc}"


def _row(
    probe: _Probe,
    reachable: bool,
    health_error: str | None,
    first: _Sample,
    second: _Sample | None,
    stored: StoredPositions | None,
    db_error: str | None,
) -> InstanceStatus:
    latest = second if second is not None and second.body is not None else first
    if latest.body is not None:
        body = latest.body
        return InstanceStatus(
            instance=probe.name,
            address=probe.address,
            reachable=reachable,
            position=body.position,
            position_source="live",
            sequence=body.sequence,
            queued_events=body.queued_events,
            rooms_owned=body.rooms_owned,
            events_per_s=_rate(first, second),
            error=health_error,
        )
    errors = [e for e in (health_error, first.error, db_error) if e]
    stored_position = None if stored is None else stored.positions.get(probe.name)
    return InstanceStatus(
        instance=probe.name,
        address=probe.address,
        reachable=reachable,
        position=stored_position,
        position_source=None if stored_position is None else "stored",
        error="; ".join(dict.fromkeys(errors)) or None,
    )


def _rate(first: _Sample, second: _Sample | None) -> float | None:
    if second is None or first.body is None or second.body is None:
        return None
    elapsed = second.at - first.at
    grown = second.body.events_persisted - first.body.events_persisted
    # A restart between the samples resets the counter: no honest rate then.
    if elapsed <= 0 or grown < 0:
        return None
    return grown / elapsed


def _with_lag(rows: list[InstanceStatus], stored: StoredPositions | None) -> list[InstanceStatus]:
    # The sequence is shared by every writer, so the highest value anyone
    # reports is the stream's head.
    seen = [r.sequence for r in rows if r.sequence is not None]
    if stored is not None and stored.sequence is not None:
        seen.append(stored.sequence)
    if not seen:
        return rows
    head = max(seen)
    return [
        msgspec.structs.replace(
            r, sequence=head, lag=None if r.position is None else max(0, head - r.position)
        )
        for r in rows
    ]


_COLUMNS = ("INSTANCE", "ADDRESS", "UP", "POSITION", "LAG", "QUEUED", "ROOMS", "EVENTS/S")


def exit_status(statuses: Sequence[InstanceStatus]) -> int:
    """1 when an instance did not answer, so that scripts and probes notice."""
    return 0 if all(s.reachable for s in statuses) else 1


def format_status(statuses: Sequence[InstanceStatus]) -> str:
    """A fixed-width table, a summary line above it and notes below it."""
    table = [_COLUMNS, *(_cells(s) for s in statuses)]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    lines = [_summary(statuses)]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    if any(s.position_source == "stored" for s in statuses):
        lines.append("* position read from stream_positions: the instance did not answer")
    lines += [f"{s.instance}: {s.error}" for s in statuses if s.error]
    return "\n".join(lines)


def _cells(s: InstanceStatus) -> tuple[str, ...]:
    position = _num(s.position) + ("*" if s.position_source == "stored" else "")
    rate = "-" if s.events_per_s is None else f"{s.events_per_s:.1f}"
    return (
        s.instance,
        s.address,
        "yes" if s.reachable else "NO",
        position,
        _num(s.lag),
        _num(s.queued_events),
        _num(s.rooms_owned),
        rate,
    )


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _summary(statuses: Sequence[InstanceStatus]) -> str:
    head = next((s.sequence for s in statuses if s.sequence is not None), None)
    positions = [s.position for s in statuses]
    complete = (
        "unknown"
        if not positions or any(p is None for p in positions)
        else str(min(p for p in positions if p is not None))
    )
    up = sum(s.reachable for s in statuses)
    return (
        f"events stream: sequence at {_num(head)}, complete up to {complete}; "
        f"{up}/{len(statuses)} writers up"
    )
