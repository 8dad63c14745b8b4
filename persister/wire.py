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


request_decoder = msgspec.json.Decoder(PersistRequest)
response_decoder = msgspec.json.Decoder(PersistResponse)
encoder = msgspec.json.Encoder()
