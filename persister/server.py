"""`persister run`: assemble one persister instance and serve it until SIGTERM.

SIGTERM stops accepting new requests (503), lets every accepted request be
committed and answered, publishes a last POSITION, then exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from redis.exceptions import RedisError

from persister.config import Config, ConfigError
from persister.errors import PersisterError
from persister.http.app import build_app
from persister.replication.publisher import Publisher, redis_client
from persister.writer.lane import LaneSettings
from persister.writer.ownership import LiveShardMap
from persister.writer.queue import Budget
from persister.writer.service import Writer

logger = logging.getLogger(__name__)


def build_writer(config: Config, instance: str) -> Writer:
    limits = config.persist
    settings = LaneSettings(
        instance=instance,
        database_url=config.database.url,
        max_batch_events=limits.max_batch_events,
        connect_timeout_s=config.database.connect_timeout_s,
    )
    budget = Budget(limits.max_queued_events, limits.max_queued_bytes, limits.retry_after_s)
    owners = LiveShardMap(config.database.url, tuple(config.stream_writers.events), config.sharding)
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


async def serve(config: Config, instance: str) -> None:
    await check_redis(config.redis.url)
    writer = build_writer(config, instance)
    await writer.start()
    location = config.location(instance)
    if location.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "listening on %s, not loopback: keep this port off public networks", location.host
        )
    app = build_app(
        writer,
        config.secret(),
        config.persist.max_body_bytes,
        config.persist.max_events_per_request,
    )
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, location.host, location.port)
    try:
        await site.start()
    except OSError as exc:
        await writer.stop()
        raise PersisterError(
            f"cannot listen on {location.host}:{location.port}: {exc.strerror}"
        ) from None
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


async def _wait_for_termination(failed: asyncio.Future[BaseException]) -> None:
    """Until SIGTERM/SIGINT, or until the writer fails (exit non-zero then)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failed.add_done_callback(lambda _: stop.set())
    await stop.wait()
