"""The HTTP front end: decode, call the writer, encode. Nothing else.

Every `PersisterError` becomes its JSON answer in `_errors`, the one place
that knows status codes; anything else is a bug and answers 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from persister.config import ConfigError
from persister.dag import LinkRequest
from persister.errors import (
    BadRequest,
    BodyTooLarge,
    NotMyShard,
    PersisterError,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
)
from persister.http.openapi import OPENAPI_PATH, openapi_json
from persister.matrix.pdu import prepare_events
from persister.replication import catchup
from persister.replication.shardmap import SHARD_MAP_PATH
from persister.status import STATUS_PATH
from persister.wire import (
    BATCH_PATH,
    BatchAnswer,
    BatchItem,
    BatchResponse,
    ErrorBody,
    EventResult,
    PersistResponse,
    Position,
    batch_request_decoder,
    encoder,
    request_decoder,
)
from persister.writer.service import Writer

logger = logging.getLogger(__name__)

WRITER = web.AppKey("writer", Writer)
SECRET = web.AppKey("secret", bytes)
MAX_BODY = web.AppKey("max_body", int)
MAX_EVENTS = web.AppKey("max_events", int)
BODY_TIMEOUT = web.AppKey("body_timeout_s", float)
OPENAPI = web.AppKey("openapi", bytes)

# aiohttp never times out a request body that stops arriving (a client that
# claims more Content-Length than it sends, a slow loris), so we do: from the
# end of the headers to the last byte of the body.
BODY_READ_TIMEOUT_S = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class BodyTimeout(PersisterError):
    """The request body did not arrive in time; the connection is closed."""

    status = 408
    errcode = "M_REQUEST_TIMEOUT"


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=encoder.encode(body), status=status, content_type="application/json", headers=headers
    )


def error_response(error: PersisterError) -> web.Response:
    retry_after = _retry_after_s(error)
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return json_response(_error_body(error), error.status, headers)


def _error_body(error: PersisterError) -> ErrorBody:
    owner = error.owner if isinstance(error, NotMyShard) else None
    return ErrorBody(error.errcode, error.message, owner)


def _retry_after_s(error: PersisterError) -> int | None:
    if isinstance(error, Unavailable):
        return max(1, round(error.retry_after_s))
    return None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except PersisterError as error:
        response = error_response(error)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(BodyTooLarge("request body is over the configured limit"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _routing_error(request, exc)
    if response.status == BodyTimeout.status:
        await _answer_and_hang_up(request, response)
    if request.match_info.route.name == "persist":
        request.app[WRITER].metrics.request_finished(response.status, time.perf_counter() - started)
    return response


async def _answer_and_hang_up(request: web.Request, response: web.StreamResponse) -> None:
    # The rest of the body is not coming: send the answer and drop the
    # connection, rather than let aiohttp linger for it (lingering_time).
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()


def _routing_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own 404/405 (no such path or method), as JSON like every other answer."""
    errcode = "M_UNRECOGNIZED" if exc.status in (404, 405) else "M_UNKNOWN"
    message = f"{exc.reason}: {request.method} {request.path[:200]!r}"
    allow = exc.headers.get("Allow")
    return json_response(
        ErrorBody(errcode, message), exc.status, None if allow is None else {"Allow": allow}
    )


def _check_secret(request: web.Request) -> None:
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthorized(
            "missing Authorization: Bearer <replication_secret>", errcode="M_MISSING_TOKEN"
        )
    scheme, _, token = header.partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, request.app[SECRET]):
        raise Unauthorized("wrong replication secret")


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"request body of {request.content_length} bytes is over the limit of {limit}"
        )
    timeout_s = request.app[BODY_TIMEOUT]
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            # `content.read(n)` answers with what has arrived so far, which
            # is not the whole body when it comes in several segments.
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(
            f"request body not received within {timeout_s:g} s ({size} bytes arrived)"
        ) from None
    except web.RequestPayloadError as exc:
        # A body that cannot be de-chunked or decompressed (Content-Encoding).
        cause = exc.__cause__ or exc
        raise BadRequest(f"request body cannot be read: {cause}") from None
    except ConnectionError:
        # The client hung up mid-body. Nobody reads this answer, but without
        # it aiohttp logs an ERROR with a traceback for every such client.
        raise BadRequest(f"request body cut off: connection lost after {size} bytes") from None
    return b"".join(chunks)


def _decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a request body, every failure a 400 naming what is wrong."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(_not_json(body, exc), errcode="M_NOT_JSON") from None
    except UnicodeDecodeError as exc:  # msgspec < 0.23, on a string outside the PDUs
        raise BadRequest(f"request body is not UTF-8: {exc}", errcode="M_NOT_JSON") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None


def _not_json(body: bytes, exc: msgspec.DecodeError) -> str:
    # msgspec 0.23 reports invalid UTF-8 as a DecodeError; telling the two
    # apart costs a second look at the body, only on this failure path.
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as not_utf8:
        return f"request body is not UTF-8: {not_utf8}"
    return f"request body is not valid JSON: {exc}"


def _decode_request(body: bytes, room_id: str, max_events: int) -> LinkRequest:
    decoded = _decode_body(request_decoder, body)
    if not decoded.events:
        raise BadRequest("events: at least one event is required", errcode="M_INVALID_PARAM")
    if len(decoded.events) > max_events:
        raise BadRequest(
            f"events: {len(decoded.events)} events is over the limit of {max_events}",
            errcode="M_TOO_LARGE",
        )
    events = prepare_events(decoded, room_id)
    return LinkRequest(room_id, decoded.room_version, decoded.backfilled, events)


async def persist_events(request: web.Request) -> web.Response:
    _check_secret(request)
    writer = request.app[WRITER]
    room_id = request.match_info["room_id"]
    await writer.check_owner(room_id)
    if (request.content_length or 0) <= request.app[MAX_BODY]:  # else 413, from _read_body
        # Under a flood, refuse before reading and validating the body.
        writer.admit(room_id, request.content_length)
    body = await _read_body(request)
    return json_response(await _persist(request.app, room_id, body))


async def _persist(app: web.Application, room_id: str, body: bytes) -> PersistResponse:
    writer = app[WRITER]
    link = _decode_request(body, room_id, app[MAX_EVENTS])
    return _response(writer, await writer.persist(link, len(body)))


def _response(writer: Writer, results: list[EventResult]) -> PersistResponse:
    highest = max((r.stream_ordering for r in results), default=0)
    return PersistResponse(results, Position(writer.instance, max(writer.position(), highest)))


async def persist_batch(request: web.Request) -> web.Response:
    """Several rooms' persist requests in one HTTP request, each handled and
    answered exactly as its room's own endpoint would (its own transaction,
    its own status): a creator's client sends the requests that leave for a
    persister at the same moment as one, so that HTTP costs once per batch
    rather than per request (`persister.batching`). Not in the contract; an
    addition to it."""
    _check_secret(request)
    if (request.content_length or 0) <= request.app[MAX_BODY]:  # else 413, from _read_body
        # As for one room's call: under a flood, refuse before reading.
        request.app[WRITER].admit_batch(request.content_length)
    body = await _read_body(request)
    items = _decode_batch(body, request.app[MAX_EVENTS])
    return json_response(BatchResponse(await _batch_answers(request.app, items)))


# A request of a batch: refused at once, queued in its lane, or (when the map
# must be read again to know whether it is ours) handled by a task of its own.
Queued = BatchAnswer | asyncio.Future[list[EventResult]] | asyncio.Task[BatchAnswer]


async def _batch_answers(app: web.Application, items: list[BatchItem]) -> list[BatchAnswer]:
    """Queue every request of the batch, then wait for them all. A task and a
    shield per request cost as much as their validation (single events)."""
    writer = app[WRITER]
    started = time.perf_counter()
    queued = [_queue(app, item) for item in items]
    waiting = [q for q in queued if not isinstance(q, BatchAnswer)]
    if waiting:
        try:
            # Not gather: a client that hangs up must not cancel half-done batches.
            await asyncio.wait(waiting)
        except asyncio.CancelledError:
            for future in waiting:
                future.add_done_callback(_nobody_reads)
            raise
    answers = [_batch_answer(writer, item, q) for item, q in zip(items, queued, strict=True)]
    seconds = time.perf_counter() - started
    for answer in answers:
        writer.metrics.request_finished(answer.status, seconds)
    return answers


def _queue(app: web.Application, item: BatchItem) -> Queued:
    if not app[WRITER].owns(item.room_id):
        return asyncio.ensure_future(_queue_checking_owner(app, item))
    return _submit(app, item)


def _submit(
    app: web.Application, item: BatchItem
) -> BatchAnswer | asyncio.Future[list[EventResult]]:
    writer = app[WRITER]
    try:
        body = bytes(item.request)
        writer.admit(item.room_id, len(body))
        return writer.submit(_decode_request(body, item.room_id, app[MAX_EVENTS]), len(body))
    except Exception as exc:  # each request of a batch has its own answer
        return _error_answer(item, exc)


async def _queue_checking_owner(app: web.Application, item: BatchItem) -> BatchAnswer:
    """`_queue` once the map is fresh: the room may have come to this writer."""
    try:
        await app[WRITER].check_owner(item.room_id)
    except Exception as exc:  # each request of a batch has its own answer
        return _error_answer(item, exc)
    queued = _submit(app, item)
    if not isinstance(queued, BatchAnswer):
        await asyncio.wait([queued])
    return _batch_answer(app[WRITER], item, queued)


def _batch_answer(writer: Writer, item: BatchItem, queued: Queued) -> BatchAnswer:
    if isinstance(queued, BatchAnswer):
        return queued
    if isinstance(queued, asyncio.Task):
        return queued.result()
    try:
        results = queued.result()
    except Exception as exc:  # each request of a batch has its own answer
        return _error_answer(item, exc)
    return BatchAnswer(200, msgspec.Raw(encoder.encode(_response(writer, results))))


def _error_answer(item: BatchItem, exc: Exception) -> BatchAnswer:
    if isinstance(exc, PersisterError):
        encoded = encoder.encode(_error_body(exc))
        return BatchAnswer(exc.status, msgspec.Raw(encoded), _retry_after_s(exc))
    # A bug: this request's answer says so, the others keep theirs.
    logger.error("persisting room %s of a batch failed", item.room_id[:200], exc_info=exc)
    return BatchAnswer(500, msgspec.Raw(encoder.encode(ErrorBody("M_UNKNOWN", "internal error"))))


def _nobody_reads(future: asyncio.Future[Any]) -> None:
    # Its client hung up: mark the outcome read, or asyncio logs it as lost.
    if not future.cancelled():
        future.exception()


def _decode_batch(body: bytes, max_requests: int) -> list[BatchItem]:
    items = _decode_body(batch_request_decoder, body).requests
    if not items:
        raise BadRequest("requests: at least one request is required", errcode="M_INVALID_PARAM")
    if len(items) > max_requests:
        raise BadRequest(
            f"requests: {len(items)} requests is over the limit of {max_requests}",
            errcode="M_TOO_LARGE",
        )
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.room_id in seen:
            # Their order would be lost: they would run side by side.
            raise BadRequest(
                f"requests[{index}].room_id: room {item.room_id[:200]!r} appears twice; "
                "send a room's requests one after the other",
                errcode="M_INVALID_PARAM",
            )
        seen.add(item.room_id)
    return items


async def stream_events(request: web.Request) -> web.Response:
    """The catch-up API (`persister.replication.catchup`)."""
    _check_secret(request)
    query = catchup.parse_query(request.query)
    rows, limited = await request.app[WRITER].stream_rows(
        query.from_exclusive, query.to_inclusive, query.limit
    )
    return json_response(catchup.answer(query, rows, limited))


async def shard_map(request: web.Request) -> web.Response:
    """The map in force, freshly read: what a client asks after a 421."""
    _check_secret(request)
    try:
        current = await request.app[WRITER].owners.refresh()
    except psycopg.Error as exc:
        raise StoreUnavailable(f"cannot read the shard map: {exc}") from None
    return json_response(current)


async def metrics(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    writer.metrics.set_queue_depth(writer.queued_events())
    return web.Response(body=writer.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    return json_response(await request.app[WRITER].status())


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def health(request: web.Request) -> web.Response:
    if request.app[WRITER].ready:
        return web.Response(text="OK")
    return web.Response(text="not ready", status=503)


def build_app(
    writer: Writer,
    secret: str,
    max_body: int,
    max_events: int,
    *,
    body_timeout_s: float = BODY_READ_TIMEOUT_S,
) -> web.Application:
    if not secret.strip():
        # `Authorization: Bearer` with no token at all would match it.
        raise ConfigError("the replication secret is empty (check replication_secret_path)")
    # aiohttp's own limit sits above ours so that we, not it, word the 413.
    app = web.Application(middlewares=[_errors], client_max_size=max_body + 1024)
    app[WRITER] = writer
    app[SECRET] = secret.encode("utf-8")
    app[MAX_BODY] = max_body
    app[MAX_EVENTS] = max_events
    app[BODY_TIMEOUT] = body_timeout_s
    app[OPENAPI] = openapi_json().encode("utf-8")
    app.router.add_post("/_persist/v1/rooms/{room_id}/events", persist_events, name="persist")
    app.router.add_post(BATCH_PATH, persist_batch, name="persist-batch")
    app.router.add_get(catchup.CATCH_UP_PATH, stream_events, name="catch-up")
    app.router.add_get(SHARD_MAP_PATH, shard_map)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(STATUS_PATH, status)
    app.router.add_get(OPENAPI_PATH, openapi)
    return app
