"""What a writer takes from its peers' messages (persister.replication.peers)."""

from __future__ import annotations

import pytest

from persister.replication.messages import (
    decode_command,
    encode_command,
    position_command,
    rdata_command,
)
from persister.replication.peers import encode_drawn, peer_position
from tests.integration.stream_writers import event_row


def test_a_peers_drawn_hint_gives_how_far_the_sequence_went() -> None:
    assert peer_position(encode_drawn("p2", 42), "p1") == 42


@pytest.mark.parametrize(
    "data",
    [
        encode_drawn("p1", 42),  # our own
        # Positions and rows are for readers: a writer takes its peers' hints.
        encode_command(position_command("p2", 3, 9)),
        encode_command(rdata_command("p2", 3, 9, (event_row(5, "p2"), event_row(9, "p2")))),
        b'{"cmd":"POSITION","stream":"receipts","instance":"p2","prev":1,"pos":2}',
        b'{"cmd":"SHARDMAP","epoch":3,"writers":["p1"]}',
        b"not json",
    ],
)
def test_anything_else_moves_nothing(data: bytes) -> None:
    assert peer_position(data, "p1") is None


def test_readers_ignore_the_drawn_hint() -> None:
    # It is a fact among writers, not a promise: the reader library skips it.
    assert decode_command(encode_drawn("p2", 42)) is None
