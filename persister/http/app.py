"""The HTTP front end: decode, call the writer, encode. Nothing else.

Every `PersisterError` becomes its JSON answer in `_errors`, the one place
that knows status codes; anything else is a bug and answers 500.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from persister.dag import LinkRequest
from persister.errors import (
    BadRequest,
    BodyTooLarge,
    NotMyShard,
    PersisterError,
    Unauthorized,
    Unavailable,
)
from persister.matrix.pdu import prepare_events
from persister.status import STATUS_PATH
from persister.wire import ErrorBody, PersistResponse, Position, encoder, request_decoder
from persister.writer.service import Writer

logger = logging.getLogger(__name__)

WRITER = web.AppKey("writer", Writer)
SECRET = web.AppKey("secret", bytes)
MAX_BODY = web.AppKey("max_body", int)
MAX_EVENTS = web.AppKey("max_events", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=encoder.encode(body), status=status, content_type="application/json", headers=headers
    )


def error_response(error: PersisterError) -> web.Response:
    owner = error.owner if isinstance(error, NotMyShard) else None
    headers = None
    if isinstance(error, Unavailable):
        headers = {"Retry-After": str(max(1, round(error.retry_after_s)))}
    return json_response(ErrorBody(error.errcode, error.message, owner), error.status, headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except PersisterError as error:
        response = error_response(error)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(BodyTooLarge("request body is over the configured limit"))
    if request.match_info.route.name == "persist":
        request.app[WRITER].metrics.request_finished(response.status, time.perf_counter() - started)
    return response


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
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
    return body


def _decode_request(body: bytes, room_id: str, max_events: int) -> LinkRequest:
    try:
        decoded = request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", errcode="M_NOT_JSON") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
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
    body = await _read_body(request)
    link = _decode_request(body, room_id, request.app[MAX_EVENTS])
    results = await writer.persist(link, len(body))
    highest = max((r.stream_ordering for r in results), default=0)
    position = Position(writer.instance, max(writer.position(), highest))
    return json_response(PersistResponse(results, position))


async def metrics(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    writer.metrics.set_queue_depth(writer.queued_events())
    return web.Response(body=writer.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    return json_response(await request.app[WRITER].status())


async def health(request: web.Request) -> web.Response:
    if request.app[WRITER].ready:
        return web.Response(text="OK")
    return web.Response(text="not ready", status=503)


def build_app(writer: Writer, secret: str, max_body: int, max_events: int) -> web.Application:
    # aiohttp's own limit sits above ours so that we, not it, word the 413.
    app = web.Application(middlewares=[_errors], client_max_size=max_body + 1024)
    app[WRITER] = writer
    app[SECRET] = secret.encode("utf-8")
    app[MAX_BODY] = max_body
    app[MAX_EVENTS] = max_events
    app.router.add_post("/_persist/v1/rooms/{room_id}/events", persist_events, name="persist")
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(STATUS_PATH, status)
    return app
