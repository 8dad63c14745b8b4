"""The catch-up API: the events stream between two positions, over HTTP.

    GET /_persist/v1/streams/events?from=1200&to=1240&limit=100
    Authorization: Bearer <replication_secret>

    200 {"rows": [{"stream_ordering": 1201, "event_id": "$...", "room_id": "!...",
                   "type": "...", "state_key": null, "sender": "@..."}, ...],
         "limited": false, "to": 1240}

Every persister serves it from the shared tables, so any one of them answers
for the whole stream. `rows` are the forward events with
`from < stream_ordering <= to`, in stream order, at most `limit` of them
(default 100, capped at 1000). `to` in the answer is how far the rows go:
the asked `to`, or, when `limited` (more rows remain), the last row's
ordering, from which the next call continues. The answer holds what is
committed now; it is the complete stretch only up to a position the stream
is known to be complete at (a reader's `complete_up_to`), which is what a
reader asks for.

Bad parameters answer 400 M_INVALID_PARAM naming the parameter; a missing or
wrong secret 401; a database outage 503 with Retry-After.

`CatchUpClient` is the reader's side (`StreamReader(catch_up_url=...)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import aiohttp
import msgspec

from persister.errors import BadRequest
from persister.replication.messages import EventRow

CATCH_UP_PATH: Final = "/_persist/v1/streams/events"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
# Stream orderings are PostgreSQL bigints; a bigger number is bad input,
# not a database error.
MAX_POSITION: Final = 2**63 - 1
REQUEST_TIMEOUT_S: Final = 10.0


class StreamRows(msgspec.Struct, frozen=True):
    """The answer's body."""

    rows: list[EventRow]
    limited: bool
    to: int


class RowsQuery(msgspec.Struct, frozen=True):
    from_exclusive: int
    to_inclusive: int
    limit: int


_answer_decoder: Final = msgspec.json.Decoder(StreamRows)


def parse_query(query: Mapping[str, str]) -> RowsQuery:
    """The request's parameters, or BadRequest saying which one is wrong."""
    from_exclusive = _position(query, "from")
    to_inclusive = _position(query, "to")
    if to_inclusive < from_exclusive:
        raise BadRequest(
            f"to ({to_inclusive}) must not be below from ({from_exclusive})",
            errcode="M_INVALID_PARAM",
        )
    limit = DEFAULT_LIMIT
    if "limit" in query:
        limit = _integer(query, "limit")
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", errcode="M_INVALID_PARAM")
    return RowsQuery(from_exclusive, to_inclusive, min(limit, MAX_LIMIT))


def answer(query: RowsQuery, rows: list[EventRow], limited: bool) -> StreamRows:
    return StreamRows(rows, limited, rows[-1].stream_ordering if limited else query.to_inclusive)


def _position(query: Mapping[str, str], name: str) -> int:
    if name not in query:
        raise BadRequest(
            f"{name} is required: a stream position (a non-negative integer)",
            errcode="M_INVALID_PARAM",
        )
    value = _integer(query, name)
    if value < 0:
        raise BadRequest(
            f"{name} must be a non-negative stream position, not {value}",
            errcode="M_INVALID_PARAM",
        )
    return value


def _integer(query: Mapping[str, str], name: str) -> int:
    text = query[name]
    # int() also takes "+5", " 5" and "5_000"; a position is plain digits.
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
        raise BadRequest(f"{name} must be an integer, not {text!r}", errcode="M_INVALID_PARAM")
    value = int(text)
    if value > MAX_POSITION:
        raise BadRequest(f"{name} is out of range: {value}", errcode="M_INVALID_PARAM")
    return value


class CatchUpUnavailable(Exception):
    """No answer this time (connection, timeout, 5xx); another try may work."""


class CatchUpRejected(Exception):
    """The persister refused the call or answered nonsense; retrying cannot help
    (a wrong secret, a persister without this API, a broken answer)."""


class CatchUpClient:
    """Reads stretches of the stream from one of several persisters.

    One call is one attempt; after a failure the next call goes to the next
    URL, so a reader given every persister's URL rides out any one of them
    being down. The caller retries (with its own backoff and closing rules).
    """

    def __init__(self, base_urls: Sequence[str], secret: str) -> None:
        if not base_urls:
            raise ValueError("catch-up needs at least one persister URL")
        self._urls = [url.rstrip("/") + CATCH_UP_PATH for url in base_urls]
        self._next = 0
        self._headers = {"Authorization": f"Bearer {secret}"}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.calls = 0

    async def rows_between(
        self, from_exclusive: int, to_inclusive: int, limit: int
    ) -> tuple[list[EventRow], int]:
        """Rows in (from_exclusive, upto] and `upto`, how far they go (<= to_inclusive)."""
        url = self._urls[self._next]
        params = {"from": str(from_exclusive), "to": str(to_inclusive), "limit": str(limit)}
        self.calls += 1
        try:
            async with self._http().get(url, params=params, headers=self._headers) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._rotate()
            raise CatchUpUnavailable(f"{url}: {exc!r}") from None
        if status >= 500:
            self._rotate()
            raise CatchUpUnavailable(f"{url} answered {status}: {body[:200]!r}")
        if status != 200:
            raise CatchUpRejected(f"{url} answered {status}: {body[:500]!r}")
        try:
            stretch = _answer_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise CatchUpRejected(f"{url} answered an unreadable body: {exc}") from None
        _check(stretch, from_exclusive, to_inclusive, url)
        return stretch.rows, stretch.to

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _rotate(self) -> None:
        self._next = (self._next + 1) % len(self._urls)

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise CatchUpUnavailable("the catch-up client is closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            )
        return self._session


def _check(stretch: StreamRows, from_exclusive: int, to_inclusive: int, url: str) -> None:
    """A reader that trusted a wrong `to` would skip rows for good: refuse it."""
    orderings = [row.stream_ordering for row in stretch.rows]
    in_order = all(a < b for a, b in zip(orderings, orderings[1:], strict=False))
    inside = all(from_exclusive < o <= stretch.to for o in orderings)
    if stretch.limited:
        reaches = bool(orderings) and orderings[-1] == stretch.to <= to_inclusive
    else:
        reaches = stretch.to == to_inclusive
    if not (in_order and inside and reaches):
        raise CatchUpRejected(
            f"{url} answered an inconsistent stretch for ({from_exclusive}, {to_inclusive}]: "
            f"to={stretch.to}, limited={stretch.limited}, orderings {orderings[:3]}..."
        )
