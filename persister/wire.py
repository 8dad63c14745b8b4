"""Shapes of the persist API's requests and answers (contract section 3).

Decoders and encoders are built once here; the HTTP layer only calls them.
"""

from __future__ import annotations

import msgspec


class EventEnvelope(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Kept raw: the PDU is stored exactly as received, and the Matrix rules
    # in `persister.matrix` decode it once into the shapes they need.
    pdu: msgspec.Raw
    event_id: str | None = None
    outlier: bool = False
    rejected_reason: str | None = None


class PersistRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    room_version: str
    events: list[EventEnvelope]
    backfilled: bool = False


class EventResult(msgspec.Struct, frozen=True, gc=False):
    event_id: str
    stream_ordering: int
    depth: int
    duplicate: bool


class Position(msgspec.Struct, frozen=True, gc=False):
    instance: str
    stream_id: int


class PersistResponse(msgspec.Struct, frozen=True):
    results: list[EventResult]
    position: Position


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    errcode: str
    error: str
    owner: str | None = None


# Where `BatchRequest`s go (the rooms' own endpoint is in the contract).
BATCH_PATH = "/_persist/v1/batch"


class BatchItem(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    room_id: str
    # The body the room's own endpoint takes, checked exactly as there.
    request: msgspec.Raw


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Several rooms' persist requests in one HTTP request."""

    # An extension of the contract's API: `persister.http.app.persist_batch`.
    requests: list[BatchItem]


class BatchAnswer(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the room's own endpoint would have answered that request."""

    status: int
    # A PersistResponse when status is 200, else an ErrorBody.
    body: msgspec.Raw
    retry_after_s: int | None = None


class BatchResponse(msgspec.Struct, frozen=True):
    responses: list[BatchAnswer]


request_decoder = msgspec.json.Decoder(PersistRequest)
response_decoder = msgspec.json.Decoder(PersistResponse)
batch_request_decoder = msgspec.json.Decoder(BatchRequest)
batch_response_decoder = msgspec.json.Decoder(BatchResponse)
encoder = msgspec.json.Encoder()
