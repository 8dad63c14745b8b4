"""The persist API (contract section 3) as an OpenAPI 3.1 document.

Request and answer bodies come from the msgspec Structs that the server
decodes and encodes with (`persister.wire`, `persister.status`), so the
document cannot drift from the code; everything else (paths, status codes,
headers) is written out here. `docs/openapi.json` is this module's output,
checked in; a test fails when it is stale. Regenerate it with

    python -m persister.http.openapi > docs/openapi.json

The server also serves it at `GET /_persist/v1/openapi.json`.
"""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

from persister.matrix.pdu import MAX_PDU_BYTES
from persister.replication.catchup import CATCH_UP_PATH, StreamRows
from persister.replication.shardmap import SHARD_MAP_PATH
from persister.sharding import ShardMap
from persister.status import HEALTH_PATH, STATUS_PATH, InstanceStatusBody
from persister.wire import (
    BATCH_PATH,
    BatchRequest,
    BatchResponse,
    ErrorBody,
    PersistRequest,
    PersistResponse,
)

OPENAPI_PATH: Final = "/_persist/v1/openapi.json"
PERSIST_PATH: Final = "/_persist/v1/rooms/{room_id}/events"
METRICS_PATH: Final = "/metrics"

JsonObject = dict[str, Any]

_REF = "#/components/schemas/{name}"

# The PDU is kept raw by the decoder (`msgspec.Raw`, schema `{}`) and checked
# by persister.matrix.pdu; the document says what that check wants.
_PDU_SCHEMA: Final[JsonObject] = {
    "type": "object",
    "description": (
        "The event in federation (PDU) format of the request's room version. Checked by the "
        "persister: type, sender, content, depth, origin_server_ts, prev_events and "
        "auth_events are required; room_id equals the path's (absent from a room version 12 "
        "m.room.create, whose room ID is derived from its event ID); event_id is required in "
        f"room versions 1 and 2; no floats; at most {MAX_PDU_BYTES} bytes as canonical JSON."
    ),
    "required": [
        "type",
        "sender",
        "content",
        "depth",
        "origin_server_ts",
        "prev_events",
        "auth_events",
    ],
}

# (status, what it means) for every error the persist call can answer.
_PERSIST_ERRORS: Final = (
    (
        "400",
        "Malformed JSON, a schema violation, a room mismatch, an event over "
        f"{MAX_PDU_BYTES} bytes in canonical JSON, an event_id that does not match its hash, "
        "an unknown room version. `error` names the event index and field.",
    ),
    ("401", "The Authorization header is missing or holds the wrong secret."),
    ("408", "The request body did not arrive in time (the connection is closed)."),
    ("413", "The request body is over the configured limit (persist.max_body_bytes)."),
    ("421", "Another persister owns the room; `owner` names it. Nothing was persisted."),
    (
        "503",
        "The persister is saturated, draining or cannot reach PostgreSQL; nothing was "
        "persisted. Retry after `Retry-After` seconds.",
    ),
)

_RETRY_AFTER: Final[JsonObject] = {
    "description": "Seconds to wait before retrying.",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}


def _json(ref: str, description: str, headers: JsonObject | None = None) -> JsonObject:
    answer: JsonObject = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": ref}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _text(description: str, media_type: str = "text/plain") -> JsonObject:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _persist_operation(refs: dict[str, str]) -> JsonObject:
    responses: JsonObject = {
        "200": _json(
            refs["PersistResponse"],
            "Every event is committed (one transaction for the whole request). `position` is "
            "a stream position on this instance at which all of the request's events are "
            "visible; `duplicate: true` marks an event that was already stored.",
        )
    }
    for status, meaning in _PERSIST_ERRORS:
        headers = {"Retry-After": _RETRY_AFTER} if status == "503" else None
        responses[status] = _json(refs["ErrorBody"], meaning, headers)
    return {
        "operationId": "persistEvents",
        "summary": "Persist events of one room, atomically and in request order",
        "security": [{"replicationSecret": []}],
        "parameters": [
            {
                "name": "room_id",
                "in": "path",
                "required": True,
                "description": "The room ID, percent-encoded (`!` as %21, `:` as %3A, `/` as %2F).",
                "schema": {"type": "string"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": refs["PersistRequest"]}}},
        },
        "responses": responses,
    }


def _batch_operation(refs: dict[str, str]) -> JsonObject:
    return {
        "operationId": "persistBatch",
        "summary": "Persist requests of several rooms, each as its room's call would",
        "description": (
            "Not in the contract: an addition the persister's own client uses to send the "
            "requests of different rooms that leave at the same moment in one HTTP exchange. "
            "Each `request` is the body of its room's persist call and is handled exactly as "
            "that call would be (its own transaction); its answer holds the status and body "
            "that call would have answered, and `retry_after_s` where that would be the "
            "Retry-After header. A room may appear once per batch."
        ),
        "security": [{"replicationSecret": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": refs["BatchRequest"]}}},
        },
        "responses": {
            "200": _json(
                refs["BatchResponse"],
                "One answer per request, in request order, whatever each answer's status.",
            ),
            "400": _json(
                refs["ErrorBody"],
                "Malformed JSON or schema, no request, more requests than "
                "persist.max_events_per_request, or a room named twice. Nothing was persisted.",
            ),
            "401": _json(refs["ErrorBody"], "Missing or wrong secret."),
            "408": _json(refs["ErrorBody"], "The request body did not arrive in time."),
            "413": _json(refs["ErrorBody"], "The request body is over persist.max_body_bytes."),
        },
    }


def _catch_up_operation(refs: dict[str, str]) -> JsonObject:
    def integer(name: str, required: bool, description: str) -> JsonObject:
        return {
            "name": name,
            "in": "query",
            "required": required,
            "description": description,
            "schema": {"type": "integer", "minimum": 0},
        }

    return {
        "operationId": "streamEvents",
        "summary": "Events of the stream between two positions, for a reader catching up",
        "security": [{"replicationSecret": []}],
        "parameters": [
            integer("from", True, "Exclusive lower bound (a stream position)."),
            integer("to", True, "Inclusive upper bound."),
            integer("limit", False, "At most this many rows (default 100, at most 1000)."),
        ],
        "responses": {
            "200": _json(
                refs["StreamRows"],
                "Rows in stream order; when `limited`, `to` is the last row's ordering and "
                "the next call continues from there.",
            ),
            "400": _json(refs["ErrorBody"], "A parameter is missing or out of range."),
            "401": _json(refs["ErrorBody"], "Missing or wrong secret."),
            "503": _json(refs["ErrorBody"], "PostgreSQL cannot be reached."),
        },
    }


def _paths(refs: dict[str, str]) -> JsonObject:
    return {
        PERSIST_PATH: {"post": _persist_operation(refs)},
        BATCH_PATH: {"post": _batch_operation(refs)},
        HEALTH_PATH: {
            "get": {
                "operationId": "health",
                "summary": "Whether this instance accepts writes",
                "responses": {
                    "200": _text("`OK`: the instance accepts writes."),
                    "503": _text("`not ready`: starting, draining or without a database."),
                },
            }
        },
        STATUS_PATH: {
            "get": {
                "operationId": "status",
                "summary": "This instance's position, queue and rooms (`persister status`)",
                "responses": {
                    "200": _json(refs["InstanceStatusBody"], "The instance's status."),
                    "503": _json(refs["ErrorBody"], "PostgreSQL cannot be reached."),
                },
            }
        },
        CATCH_UP_PATH: {"get": _catch_up_operation(refs)},
        SHARD_MAP_PATH: {
            "get": {
                "operationId": "shardMap",
                "summary": "The shard map in force (writers, placement scheme, pins, epoch)",
                "security": [{"replicationSecret": []}],
                "responses": {
                    "200": _json(refs["ShardMap"], "The map, freshly read from PostgreSQL."),
                    "401": _json(refs["ErrorBody"], "Missing or wrong secret."),
                    "503": _json(refs["ErrorBody"], "PostgreSQL cannot be reached."),
                },
            }
        },
        METRICS_PATH: {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": _text("Prometheus' text exposition format.", "text/plain; version=0.0.4")
                },
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document of this API.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def openapi_document() -> JsonObject:
    """The whole document, built from the Structs each time (it is cheap)."""
    structs = (
        PersistRequest,
        PersistResponse,
        BatchRequest,
        BatchResponse,
        ErrorBody,
        InstanceStatusBody,
        StreamRows,
        ShardMap,
    )
    top, components = msgspec.json.schema_components(structs, ref_template=_REF)
    refs = {struct.__name__: schema["$ref"] for struct, schema in zip(structs, top, strict=True)}
    components["EventEnvelope"]["properties"]["pdu"] = _PDU_SCHEMA
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "persister: the persist API",
            "version": "1",
            "description": (
                "Event creators POST room events to the persister that owns the room; it "
                "links them into the room DAG, commits them and answers with their stream "
                "orderings. Errors are JSON `{errcode, error}` and never a 500 for bad input."
            ),
        },
        "paths": _paths(refs),
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "replicationSecret": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <replication_secret>`.",
                }
            },
        },
    }


def openapi_json() -> str:
    """The document as the checked-in file holds it: indented, newline-terminated."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(openapi_json(), end="")
