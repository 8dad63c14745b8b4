"""The client routes by a shard map: scheme, writers and pins, newest epoch wins."""

from __future__ import annotations

import pytest

from persister.client import PersisterClient
from persister.sharding import ShardMap, rendezvous_owner, sha256_owner

ADDRESSES = {name: ("127.0.0.1", 18100 + i) for i, name in enumerate(["p1", "p2", "p3"])}
ROOMS = [f"!room{i}:example.org" for i in range(200)]


def client(writers: tuple[str, ...] = ("p1", "p2")) -> PersisterClient:
    return PersisterClient(writers, ADDRESSES, "secret")


def test_before_any_stored_map_it_routes_by_the_config_as_epoch_0() -> None:
    c = client()
    assert c.shard_map == ShardMap(0, ("p1", "p2"), "sha256")
    assert all(c.owner_of(r) == sha256_owner(r, ["p1", "p2"]) for r in ROOMS)


def test_a_newer_map_replaces_writers_scheme_and_pins() -> None:
    c = client()
    pinned = ROOMS[0]
    assert c.set_shard_map(ShardMap(3, ("p1", "p2", "p3"), "rendezvous", {pinned: "p1"}))
    assert c.owner_of(pinned) == "p1"
    assert all(c.owner_of(r) == rendezvous_owner(r, ["p1", "p2", "p3"]) for r in ROOMS[1:])
    assert c.writers == ("p1", "p2", "p3")


def test_an_older_or_equal_epoch_is_ignored() -> None:
    c = client()
    c.set_shard_map(ShardMap(3, ("p1", "p2", "p3"), "sha256"))
    assert not c.set_shard_map(ShardMap(2, ("p1",), "sha256"))
    assert not c.set_shard_map(ShardMap(3, ("p1",), "sha256"))
    assert c.writers == ("p1", "p2", "p3")


def test_owners_learned_from_421s_last_until_the_next_epoch() -> None:
    c = client()
    room = next(r for r in ROOMS if c.owner_of(r) == "p1")
    c.remember_owner(room, "p3")
    assert c.owner_of(room) == "p3"
    c.set_shard_map(ShardMap(2, ("p1", "p2"), "sha256", {room: "p2"}))
    assert c.remembered_owners == 0
    assert c.owner_of(room) == "p2"


def test_a_map_naming_a_writer_without_address_is_adopted_all_the_same() -> None:
    c = client()
    assert c.set_shard_map(ShardMap(2, ("p1", "p9"), "sha256"))
    assert c.writers == ("p1", "p9")  # its rooms raise UnknownOwner when sent


@pytest.mark.parametrize("scheme", ["sha256", "rendezvous"])
def test_the_seed_map_places_by_the_scheme_given(scheme: str) -> None:
    c = PersisterClient(("p1", "p2"), ADDRESSES, "s", sharding=scheme)  # type: ignore[arg-type]
    assert c.shard_map.sharding == scheme
