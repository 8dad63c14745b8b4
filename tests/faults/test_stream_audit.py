"""The partition test's channel recorder reads every announcement that
MONITOR shows it, whatever its rows hold. MONITOR prints each argument
escaped (backslashes, control characters, every non-ASCII byte); read as
it comes, an RDATA naming such a state key or sender was not JSON, and the
promise check never saw it."""

from __future__ import annotations

from redis.asyncio import Redis

from persister.replication.messages import EventRow, encode_command, rdata_command
from persister.replication.peers import encode_drawn
from tests.faults.stream_audit import monitored_bytes


def _rdata(ordering: int, state_key: str | None, sender: str) -> bytes:
    row = EventRow(ordering, f"$e{ordering}", "!r:x", "m.room.member", state_key, sender)
    return encode_command(rdata_command("persister1", ordering - 1, ordering, (row,)))


async def test_monitor_shows_announcements_whose_rows_hold_escaped_characters(
    redis_url: str, redis_channel: str
) -> None:
    messages = [
        _rdata(1, None, "@plain:x"),
        _rdata(2, 'quote " backslash \\ tab \t', "@ü:x"),
        _rdata(3, '\\"', "@emoji-\U0001f600:x"),
        encode_drawn("persister1", 7),
    ]
    prefix = f"PUBLISH {redis_channel} "
    seen: list[str] = []
    async with Redis.from_url(redis_url) as watcher, Redis.from_url(redis_url) as publisher:
        async with watcher.monitor() as monitor:
            for message in messages:
                await publisher.publish(redis_channel, message)
            while len(seen) < len(messages):
                command = (await monitor.next_command())["command"]
                if command.startswith(prefix):
                    seen.append(command[len(prefix) :])
    assert [monitored_bytes(text) for text in seen] == messages
