"""Replication messages: the contract's JSON shapes, and tolerance of the future."""

from __future__ import annotations

import msgspec
import pytest

from persister.replication.messages import (
    EventRow,
    Position,
    RData,
    decode_command,
    encode_command,
    position_command,
    rdata_command,
)

ROW = EventRow(
    1234, "$ev", "!room:example.org", "m.room.member", "@u:example.org", "@u:example.org"
)


def test_position_encodes_in_the_contract_shape() -> None:
    assert encode_command(position_command("persister1", 1200, 1240)) == (
        b'{"cmd":"POSITION","stream":"events","instance":"persister1","prev":1200,"pos":1240}'
    )


def test_rdata_encodes_rows_with_the_contract_fields() -> None:
    encoded = msgspec.json.decode(encode_command(rdata_command("persister1", 1200, 1240, (ROW,))))
    assert encoded == {
        "cmd": "RDATA",
        "stream": "events",
        "instance": "persister1",
        "prev": 1200,
        "pos": 1240,
        "rows": [
            {
                "stream_ordering": 1234,
                "event_id": "$ev",
                "room_id": "!room:example.org",
                "type": "m.room.member",
                "state_key": "@u:example.org",
                "sender": "@u:example.org",
            }
        ],
    }


def test_commands_round_trip() -> None:
    for command in (position_command("p", 1, 2), rdata_command("p", 1, 1234, (ROW,))):
        assert decode_command(encode_command(command)) == command


def test_rdata_without_prev_from_another_implementation_is_accepted() -> None:
    decoded = decode_command(b'{"cmd":"RDATA","stream":"events","instance":"p","pos":3,"rows":[]}')
    assert decoded == RData(stream="events", instance="p", prev=None, pos=3, rows=())


def test_an_unknown_command_decodes_to_none_instead_of_failing() -> None:
    assert decode_command(b'{"cmd":"SHARDMAP","epoch":4,"writers":["a"]}') is None


def test_unknown_fields_of_known_commands_are_ignored() -> None:
    decoded = decode_command(
        b'{"cmd":"POSITION","stream":"events","instance":"p","prev":1,"pos":2,"epoch":9}'
    )
    assert decoded == Position(stream="events", instance="p", prev=1, pos=2)


@pytest.mark.parametrize(
    "data",
    [
        b'{"cmd":"POSITION","stream":"events"}',  # a known command, fields missing
        b'{"cmd":"POSITION","stream":"events","instance":"p","prev":"1","pos":2}',
        b"[1, 2]",
        b'{"no_cmd": true}',
        b"not json",
    ],
)
def test_malformed_messages_raise_a_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_command(data)
