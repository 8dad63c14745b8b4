"""The OpenAPI document of the persist API: generated from the Structs,
checked in as docs/openapi.json, served at /_persist/v1/openapi.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
from aiohttp.test_utils import TestClient

from persister.http.app import build_app
from persister.http.openapi import OPENAPI_PATH, PERSIST_PATH, openapi_document, openapi_json
from persister.replication.catchup import StreamRows
from persister.sharding import ShardMap
from persister.status import InstanceStatusBody
from persister.wire import (
    BatchRequest,
    BatchResponse,
    ErrorBody,
    PersistRequest,
    PersistResponse,
)
from persister.writer.service import Writer

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REGENERATE = "python -m persister.http.openapi > docs/openapi.json"


def test_the_checked_in_document_is_current() -> None:
    assert CHECKED_IN.exists(), f"docs/openapi.json is missing; create it with `{REGENERATE}`"
    assert CHECKED_IN.read_text(encoding="utf-8") == openapi_json(), (
        f"docs/openapi.json is stale: the API's Structs or routes changed. Run `{REGENERATE}`"
    )


def test_bodies_are_the_structs_schemas() -> None:
    document = openapi_document()
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
    template = "#/components/schemas/{name}"
    _, expected = msgspec.json.schema_components(structs, ref_template=template)
    schemas = document["components"]["schemas"]
    assert set(schemas) == set(expected)
    for name, schema in expected.items():
        if name == "EventEnvelope":
            # The raw PDU (schema {}) is described by what the persister checks.
            assert schema["properties"]["pdu"] == {}
            schema["properties"]["pdu"] = schemas[name]["properties"]["pdu"]
        assert schemas[name] == schema, name
    assert schemas["EventEnvelope"]["properties"]["pdu"]["type"] == "object"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_every_reference_resolves_and_the_document_is_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    assert {"title", "version"} <= set(document["info"])
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas
    # The checked-in bytes are plain JSON that any tool can load.
    assert json.loads(openapi_json()) == document


def test_the_persist_call_documents_every_answer_of_contract_section_3() -> None:
    operation = openapi_document()["paths"][PERSIST_PATH]["post"]
    answers = operation["responses"]
    assert set(answers) == {"200", "400", "401", "408", "413", "421", "503"}
    assert answers["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PersistResponse"
    }
    for status, answer in answers.items():
        if status != "200":
            schema = answer["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, status
    assert answers["503"]["headers"]["Retry-After"]["required"] is True
    assert operation["security"] == [{"replicationSecret": []}]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PersistRequest"
    }
    [room_id] = operation["parameters"]
    assert room_id["name"] == "room_id" and room_id["in"] == "path"


def test_every_documented_operation_is_routed() -> None:
    # Routing needs no writer: build_app only stores it.
    app = build_app(cast(Writer, None), "secret", max_body=1024, max_events=10)
    routed = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None}  # fmt: skip
    for path, operations in openapi_document()["paths"].items():
        for method in operations:
            assert (method.upper(), path) in routed, f"{method.upper()} {path} is not served"


async def test_the_server_serves_the_document(api: TestClient[Any, Any]) -> None:
    answer = await api.get(OPENAPI_PATH)
    assert answer.status == 200
    assert answer.content_type == "application/json"
    assert await answer.text() == openapi_json()
