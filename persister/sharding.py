"""Which persister owns a room (contract sections 2 and 7). No I/O.

Two placement schemes:
- `sha256` (default): Synapse's rule, so operators can predict placement:
  the room ID's SHA-256 read as a little-endian integer, mod N. Changing N
  moves most rooms (N/(N+1) of them when one writer is added).
- `rendezvous`: highest-random-weight hashing. Every (writer, room) pair
  gets a score and the highest score wins, so adding a writer to N moves
  only the ~1/(N+1) of rooms that now score highest on it, and removing
  one moves only its own rooms. The price: placement no longer matches
  Synapse's, so a Synapse worker computing owners itself would disagree.

Pins override either scheme for single rooms (a large bridge on its own
persister).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

Scheme = Literal["sha256", "rendezvous"]


def sha256_owner(room_id: str, writers: Sequence[str]) -> str:
    if len(writers) == 1:
        return writers[0]
    digest = hashlib.sha256(room_id.encode("utf-8")).digest()
    return writers[int.from_bytes(digest, "little") % len(writers)]


def rendezvous_owner(room_id: str, writers: Sequence[str]) -> str:
    room = room_id.encode("utf-8")
    return max(writers, key=lambda writer: _score(writer.encode("utf-8"), room))


def _score(writer: bytes, room: bytes) -> bytes:
    # A NUL cannot occur in either name, so no two pairs hash the same input.
    return hashlib.sha256(writer + b"\0" + room).digest()


def place(room_id: str, writers: Sequence[str], scheme: Scheme) -> str:
    if scheme == "rendezvous":
        return rendezvous_owner(room_id, writers)
    return sha256_owner(room_id, writers)


class ShardMap(msgspec.Struct, frozen=True):
    """The writer pool of one epoch, as stored in `shard_map_epochs`."""

    epoch: int
    writers: tuple[str, ...]
    sharding: Scheme = "sha256"
    pins: Mapping[str, str] = msgspec.field(default_factory=dict)
    # None while the epoch is installed but not yet drained: it routes, but
    # is not in force (see persister.storage.shard_map).
    sequence_at_start: int | None = 0

    @property
    def in_force(self) -> bool:
        return self.sequence_at_start is not None

    def start(self) -> int:
        """`sequence_at_start` of a map in force."""
        if self.sequence_at_start is None:
            raise ValueError(f"shard map epoch {self.epoch} is not in force")
        return self.sequence_at_start

    def owner(self, room_id: str) -> str:
        pinned = self.pins.get(room_id)
        if pinned is not None:
            return pinned
        return place(room_id, self.writers, self.sharding)

    def all_writers(self) -> set[str]:
        """Writers that own something: the list and every pin target."""
        return {*self.writers, *self.pins.values()}


def moved_rooms(room_ids: Sequence[str], before: ShardMap, after: ShardMap) -> dict[str, str]:
    """The rooms whose owner changes, with their new owner."""
    moved = {}
    for room_id in room_ids:
        owner = after.owner(room_id)
        if before.owner(room_id) != owner:
            moved[room_id] = owner
    return moved
