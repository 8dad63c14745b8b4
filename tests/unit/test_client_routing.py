"""Which persister the client sends a room to (contract sections 2 and 7).

The expected owners are computed here from first principles, not with
`int.from_bytes`: read as a little-endian integer, the SHA-256 digest's
value mod 2 is its first byte's lowest bit (256 is even), and its value
mod 3 is the sum of its bytes mod 3 (256 leaves remainder 1 when divided
by 3). A big-endian reading would look at the last byte instead, which
several rooms below tell apart.
"""

from __future__ import annotations

import hashlib

import pytest

from persister.client import ClientOptions, PersisterClient, persist_url
from persister.config import config_from_mapping

TWO = ["w0", "w1"]
THREE = ["w0", "w1", "w2"]
ADDRESSES = {name: ("127.0.0.1", 18100 + i) for i, name in enumerate(["w0", "w1", "w2", "w3"])}

# room ID -> (owner index among 2 writers, owner index among 3 writers)
PINNED = {
    "!abc:example.org": (0, 0),
    "!room1:example.org": (1, 2),
    "!room2:example.org": (1, 2),
    "!room3:example.org": (0, 2),
    "!zzz:localhost": (1, 1),
    "!été:example.org": (1, 0),
    "!OGEhHVWSdvArJzumhm:matrix.org": (1, 0),
}


def digest(room_id: str) -> bytes:
    return hashlib.sha256(room_id.encode("utf-8")).digest()


def little_endian_mod_2(room_id: str) -> int:
    return digest(room_id)[0] % 2


def little_endian_mod_3(room_id: str) -> int:
    return sum(digest(room_id)) % 3


def client(writers: list[str] = TWO) -> PersisterClient:
    return PersisterClient(writers, ADDRESSES, "secret")


@pytest.mark.parametrize("room_id", sorted(PINNED))
def test_pinned_placements_agree_with_sha256_read_little_endian(room_id):
    assert PINNED[room_id] == (little_endian_mod_2(room_id), little_endian_mod_3(room_id))


def test_pinned_rooms_include_ones_a_big_endian_reading_would_misplace():
    misplaced = [r for r in PINNED if digest(r)[-1] % 2 != digest(r)[0] % 2]
    assert len(misplaced) >= 2


@pytest.mark.parametrize("room_id", sorted(PINNED))
def test_room_goes_to_writer_at_sha256_little_endian_mod_n(room_id):
    two, three = PINNED[room_id]
    assert client(TWO).owner_of(room_id) == TWO[two]
    assert client(THREE).owner_of(room_id) == THREE[three]


def test_every_owner_index_occurs_among_pinned_rooms():
    assert {three for _, three in PINNED.values()} == {0, 1, 2}


def test_single_writer_owns_every_room():
    one = client(["w0"])
    assert {one.owner_of(r) for r in PINNED} == {"w0"}


def test_owner_named_by_a_421_overrides_placement():
    c = client()
    c.remember_owner("!abc:example.org", "w1")
    assert c.owner_of("!abc:example.org") == "w1"
    assert c.owner_of("!room3:example.org") == "w0"


def test_learned_owner_equal_to_placement_is_not_kept():
    c = client()
    c.remember_owner("!abc:example.org", "w1")
    c.remember_owner("!abc:example.org", "w0")
    assert c.owner_of("!abc:example.org") == "w0"
    assert c.remembered_owners == 0


def test_set_writers_adopts_new_list_and_forgets_learned_owners():
    c = client()
    c.remember_owner("!abc:example.org", "w1")
    c.set_writers(THREE)
    assert c.writers == tuple(THREE)
    assert c.remembered_owners == 0
    assert c.owner_of("!room1:example.org") == "w2"


def test_set_writers_can_bring_new_addresses():
    c = client()
    c.set_writers(["w0", "w9"], {"w0": ("h0", 1), "w9": ("h9", 9)})
    assert c.owner_of("!room1:example.org") == "w9"


def test_set_writers_refuses_writer_without_address():
    c = client()
    with pytest.raises(ValueError, match="w7"):
        c.set_writers(["w0", "w7"])
    assert c.writers == tuple(TWO)


def test_set_writers_refuses_empty_list():
    with pytest.raises(ValueError):
        client().set_writers([])


def test_oldest_learned_owner_is_forgotten_when_the_map_is_full():
    c = PersisterClient(TWO, ADDRESSES, "s", options=ClientOptions(max_remembered_owners=2))
    rooms = ["!abc:example.org", "!room3:example.org", "!zzz:localhost"]  # owners w0, w0, w1
    for room in rooms[:2]:
        c.remember_owner(room, "w1")
    c.remember_owner(rooms[2], "w0")
    assert c.remembered_owners == 2
    assert c.owner_of(rooms[0]) == "w0"  # forgotten: placement again
    assert c.owner_of(rooms[1]) == "w1"
    assert c.owner_of(rooms[2]) == "w0"


def test_from_config_uses_stream_writers_instance_map_and_secret():
    config = config_from_mapping(
        {
            "replication_secret": "s3cret",
            "stream_writers": {"events": ["p1", "p2"]},
            "instance_map": {
                "p1": {"host": "10.0.0.1", "port": 1},
                "p2": {"host": "10.0.0.2", "port": 2},
            },
        }
    )
    c = PersisterClient.from_config(config)
    assert c.writers == ("p1", "p2")
    assert c.owner_of("!room1:example.org") == "p2"


def test_room_id_is_percent_encoded_as_one_path_segment():
    url = persist_url("127.0.0.1", 8008, "!a/b:example.org")
    assert str(url) == "http://127.0.0.1:8008/_persist/v1/rooms/%21a%2Fb%3Aexample.org/events"


def test_ipv6_host_is_bracketed():
    assert persist_url("::1", 8008, "!r:x").host == "::1"
    assert str(persist_url("::1", 8008, "!r:x")).startswith("http://[::1]:8008/")
