"""The SHARDMAP message: a new shard map, announced on the Redis channel.

    {"cmd": "SHARDMAP", "epoch": 3, "writers": ["p1", "p2", "p3"],
     "sharding": "rendezvous", "pins": {"!room:hs": "p3"},
     "sequence_at_start": 12345, "in_force": true}

`persister reshard` publishes it twice (`persister.reshard`), each time on
the channel and on the hints channel beside it, which is the one persisters
follow (`persister.replication.peers`):

- `in_force: false` while it installs the epoch, *before* the COMMIT.
  Readers add the map's writers at once; persisters start a fenced reload,
  which returns at the COMMIT (or the rollback: the epoch may still roll
  back), so they route by the new epoch from then on. A writer the map adds
  writes nothing before the epoch is drained (all its rooms are gained).
- `in_force: true` once the epoch is drained (in force). Clients route by
  it, persisters refresh, readers start retiring the writers it removed.

Why the first message. Redis hands each subscriber a channel's messages in
the order they were published. A writer that the new epoch adds draws its
first ordering o after the COMMIT, hence after the first message was
published; and an announcement covering o (a position >= o, from any
writer, a heartbeat or a relay) is made only once the sequence has handed o
out, so it is published later still. A reader that applies messages in
order thus knows the new writer before anything could carry its minimum
past o, and the writer joins without pulling the minimum back.

`sequence_at_start` is ours too: the last ordering handed out before the
epoch took force (0 in a message with `in_force: false`). Every event of
an epoch has an ordering above its `sequence_at_start` and at or below the
next in-force epoch's.

Persisters also serve the map in force at `GET /_persist/v1/shard_map`
(bearer secret, as for persisting), as the JSON of a `ShardMap`; clients
read it after a 421.
"""

from __future__ import annotations

from typing import Final

import msgspec

from persister.sharding import Scheme, ShardMap

SHARDMAP: Final = "SHARDMAP"
SHARD_MAP_PATH: Final = "/_persist/v1/shard_map"


class ShardMapAnnouncement(msgspec.Struct, frozen=True, tag_field="cmd", tag=SHARDMAP):
    epoch: int
    writers: list[str]
    sharding: Scheme
    pins: dict[str, str]
    sequence_at_start: int = 0
    # An old announcer (before `in_force` existed) only published after COMMIT.
    in_force: bool = True

    def shard_map(self) -> ShardMap:
        start = self.sequence_at_start if self.in_force else None
        return ShardMap(self.epoch, tuple(self.writers), self.sharding, dict(self.pins), start)


_decoder: Final = msgspec.json.Decoder(ShardMapAnnouncement)


def announcement(shard_map: ShardMap, *, in_force: bool) -> ShardMapAnnouncement:
    return ShardMapAnnouncement(
        shard_map.epoch,
        list(shard_map.writers),
        shard_map.sharding,
        dict(shard_map.pins),
        shard_map.sequence_at_start or 0,
        in_force,
    )


def encode_announcement(shard_map: ShardMap, *, in_force: bool) -> bytes:
    return msgspec.json.encode(announcement(shard_map, in_force=in_force))


def decode_announcement(data: bytes | str) -> ShardMapAnnouncement | None:
    """The SHARDMAP in `data`; None for any other message, or one this version
    cannot read (an unknown placement scheme, say): polling covers those."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return None
