"""The messages persisters publish on Redis (contract section 6).

    {"cmd": "POSITION", "stream": "events", "instance": "persister1", "prev": 1200, "pos": 1240}
    {"cmd": "RDATA", "stream": "events", "instance": "persister1", "prev": 1200, "pos": 1240,
     "rows": [{"stream_ordering": 1234, "event_id": "$...", "room_id": "!...",
               "type": "...", "state_key": null, "sender": "@..."}]}

What a message from instance W promises (our publisher keeps to it, and the
reader relies on it):

- every event W persists with `0 < stream_ordering <= pos` is committed and
  visible, and W will never commit another one (the contract's promise);
- the message's rows are *all* of W's events with `prev < stream_ordering <= pos`
  (a POSITION is the same with no rows), so a reader whose last position for
  W lies in `[prev, pos]` misses nothing. A reader that sees `prev` above its
  own last position knows it missed messages and reads the gap from the
  database. `prev == pos` therefore means "no claim about earlier rows: catch
  up from the database", which is what a restarted publisher sends first.

`prev` on RDATA is our addition to the contract's example; an RDATA without
it is read as `prev == pos`. Unknown commands (a future "SHARDMAP") decode to
None, and unknown fields are ignored, so old readers keep working.
"""

from __future__ import annotations

from typing import Final

import msgspec

EVENTS_STREAM: Final = "events"


class EventRow(msgspec.Struct, frozen=True, gc=False):
    """One event of the stream, as RDATA carries it and `rows_between` reads it."""

    stream_ordering: int
    event_id: str
    room_id: str
    type: str
    state_key: str | None
    sender: str


class Position(msgspec.Struct, frozen=True, tag_field="cmd", tag="POSITION"):
    stream: str
    instance: str
    prev: int
    pos: int


class RData(msgspec.Struct, frozen=True, tag_field="cmd", tag="RDATA", kw_only=True):
    stream: str
    instance: str
    prev: int | None = None
    pos: int
    rows: tuple[EventRow, ...]


Command = Position | RData

_KNOWN_COMMANDS: Final = frozenset({"POSITION", "RDATA"})


class _Envelope(msgspec.Struct):
    cmd: str


_decoder: Final[msgspec.json.Decoder[Command]] = msgspec.json.Decoder(Command)
_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)
encoder: Final = msgspec.json.Encoder()


def decode_command(data: bytes | str) -> Command | None:
    """The command in `data`, or None for a command this version does not know.

    Raises msgspec.DecodeError (or its subclass ValidationError) for anything
    else that is not a well-formed message.
    """
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError:
        # Fast path failed: tell an unknown-but-valid command from garbage.
        envelope = _envelope_decoder.decode(data)
        if envelope.cmd in _KNOWN_COMMANDS:
            raise
        return None


def encode_command(command: Command) -> bytes:
    return encoder.encode(command)


def position_command(instance: str, prev: int, pos: int) -> Position:
    return Position(stream=EVENTS_STREAM, instance=instance, prev=prev, pos=pos)


def rdata_command(instance: str, prev: int, pos: int, rows: tuple[EventRow, ...]) -> RData:
    return RData(stream=EVENTS_STREAM, instance=instance, prev=prev, pos=pos, rows=rows)
