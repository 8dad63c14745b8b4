"""`persister run`: assemble one persister instance and serve it until SIGTERM.

SIGTERM stops accepting new requests (503), lets every accepted request be
committed and answered, publishes a last POSITION, then exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
from typing import Any, Final

from aiohttp import web
from redis.exceptions import RedisError

from persister.config import Config, ConfigError
from persister.errors import PersisterError
from persister.http.app import build_app
from persister.replication.publisher import Publisher, redis_client
from persister.storage.keepalive import with_partition_detection
from persister.writer.lane import LaneSettings
from persister.writer.ownership import LiveShardMap
from persister.writer.queue import Budget
from persister.writer.service import Writer

logger = logging.getLogger(__name__)

# aiohttp's server settings, explicit so that a dependency upgrade cannot
# loosen them (tests run their TestServer with the same ones):
# - keepalive_timeout closes an idle connection, and one whose request line
#   and headers do not arrive in full (a header slow loris), this many
#   seconds after it opened or after its last answer. aiohttp's own default
#   is an hour. Stalled bodies are timed out by the app (BODY_READ_TIMEOUT_S).
# - A request line or one header over 8190 bytes, or more than 128 headers,
#   answers 400 before any handler runs.
# - lingering_time: how long the rest of a refused body is read and dropped
#   before the connection is closed, so the client sees the answer.
HTTP_SERVER_SETTINGS: Final[dict[str, Any]] = {
    "keepalive_timeout": 75.0,
    "max_line_size": 8190,
    "max_field_size": 8190,
    "max_headers": 128,
    "lingering_time": 10.0,
}


def build_writer(config: Config, instance: str) -> Writer:
    limits = config.persist
    # Every connection of the writer, so a partition cannot hold its locks for hours.
    database_url = with_partition_detection(config.database.conninfo())
    settings = LaneSettings(
        instance=instance,
        database_url=database_url,
        max_batch_events=limits.max_batch_events,
        connect_timeout_s=config.database.connect_timeout_s,
        commit_in_draw_order=limits.commit_in_draw_order,
        max_batch_delay_s=limits.max_batch_delay_ms / 1000,
    )
    budget = Budget(limits.max_queued_events, limits.max_queued_bytes, limits.retry_after_s)
    owners = LiveShardMap(database_url, tuple(config.stream_writers.events), config.sharding)
    publisher = Publisher(config.redis.url, config.redis.channel, instance)
    return Writer(
        settings,
        config.database.writer_connections,
        budget,
        owners,
        publisher,
        (config.redis.url, config.redis.channel),
    )


async def check_redis(url: str) -> None:
    """`run` refuses to start without Redis; afterwards an outage only delays announcements."""
    client = redis_client(url)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        raise PersisterError(f"cannot reach Redis at {url}: {exc}") from None
    finally:
        await client.aclose()


def resolve_instance(config: Config, instance: str | None) -> str:
    name = instance or config.instance_name
    if name is None:
        raise ConfigError("name the instance with --instance or instance_name")
    config.location(name)
    return name


def tune_garbage_collector() -> None:
    """Each event allocates a few dozen short-lived container objects (the
    decoded PDU); with the default thresholds the cyclic collector runs every
    few events. Objects alive after start-up are frozen out of its scans."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def serve(config: Config, instance: str) -> None:
    secret = config.secret()  # a bad secret file stops us before we take anything over
    await check_redis(config.redis.url)
    writer = build_writer(config, instance)
    await writer.start()
    location = config.location(instance)
    warn_unless_loopback(location.host)
    app = build_app(
        writer,
        secret,
        config.persist.max_body_bytes,
        config.persist.max_events_per_request,
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **HTTP_SERVER_SETTINGS)
    await runner.setup()
    site = web.TCPSite(runner, location.host, location.port)
    try:
        await site.start()
    except OSError as exc:
        await writer.stop()
        raise PersisterError(
            f"cannot listen on {location.host}:{location.port}: {exc.strerror}"
        ) from None
    tune_garbage_collector()
    logger.info("persister %s listening on %s:%d", instance, location.host, location.port)
    await _wait_for_termination(writer.failed)
    logger.info("persister %s draining", instance)
    drained = await writer.drain(config.shutdown_timeout_s)
    if not drained:
        logger.warning("shutdown timeout reached with requests still queued")
    await runner.cleanup()
    await writer.stop()
    if writer.failed.done():
        raise PersisterError(f"stopped: {writer.failed.result()}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # any other host name may resolve to anything
        return False


def warn_unless_loopback(host: str) -> None:
    """The persist API is plain HTTP guarded by one shared secret: say so loudly."""
    if is_loopback(host):
        return
    where = "every interface" if host in ("", "0.0.0.0", "::") else host
    logger.warning(
        "SECURITY: listening on %s, not on loopback. The persist API is plain HTTP "
        "whose only guard is the replication secret: keep this port on a private network "
        "or behind TLS, never on a public one.",
        where,
    )


async def _wait_for_termination(failed: asyncio.Future[BaseException]) -> None:
    """Until SIGTERM/SIGINT, or until the writer fails (exit non-zero then)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failed.add_done_callback(lambda _: stop.set())
    await stop.wait()
