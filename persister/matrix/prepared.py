"""What the write path needs to know of one validated event."""

from __future__ import annotations

import msgspec


class PreparedEvent(msgspec.Struct, frozen=True, gc=False):
    """An event that passed every format check, with its event ID computed.

    `json` is the PDU exactly as the creator sent it (UTF-8 JSON text); it is
    what `event_json.json` stores.
    """

    event_id: str
    room_id: str
    type: str
    state_key: str | None
    sender: str
    origin_server_ts: int
    depth: int
    prev_event_ids: tuple[str, ...]
    auth_event_ids: tuple[str, ...]
    outlier: bool
    rejected_reason: str | None
    json: str
