"""The process's configuration: layered YAML files decoded into Structs.

Operators of Synapse keep one shared file for the whole pool plus one small
file per worker, so `load_config` takes several paths and merges them in
order (later files win, mappings merge key by key). Unknown keys are errors:
a typo in a config file should stop the process, not be ignored.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from persister.errors import PersisterError


class ConfigError(PersisterError):
    """The configuration cannot be used; the message says which key and why."""


# Ranges msgspec checks while decoding, naming the key ("Expected `int` >= 1
# - at `$.persist.max_body_bytes`"): a value outside them could only fail
# later, and less clearly.
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
REDIS_SCHEMES = ("redis", "rediss", "unix")


class DatabaseConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    url: str = "postgresql://127.0.0.1:5432/persister"
    # Connections each persister opens for writing; rooms are sub-sharded
    # among them so one slow transaction never stalls unrelated rooms.
    writer_connections: Positive = 2
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0

    def conninfo(self) -> str:
        """`url` with the connect timeout, unless it sets its own: without
        one, a server that accepts connections and never answers holds a
        connect for libpq's two minutes. libpq takes whole seconds, at least 2."""
        if "connect_timeout" in conninfo_to_dict(self.url):
            return self.url
        return make_conninfo(self.url, connect_timeout=max(2, round(self.connect_timeout_s)))


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    channel: str = "persister.replication"


class StreamWriters(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    events: list[str]


class InstanceLocation(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "127.0.0.1"
    port: int = 18101  # 1-65535, checked by validate() naming the instance


class PersistLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Two lanes draw from one stream, so a lane's events reach readers only
    # once the other lane's lower orderings commit: a smaller transaction
    # holds them back for less. With 1000, stream lag p99 was 24-60 ms in a
    # closed loop of 50-event requests; with 400, 6-8 ms at the same
    # throughput (bench/README.md, twelfth session). A request of more
    # events still goes, alone, in one transaction.
    max_batch_events: Positive = 400
    # How long an idle lane waits after the first request of a batch for
    # more work to join it. Zero means "send at once".
    max_batch_delay_ms: NonNegative = 0.0
    # A lane sends its write only once the writer's lower orderings have
    # finished, so lanes commit in the order they drew: stream lag p99
    # about halves, persist latency p99 grows by about as much again
    # (bench/README.md).
    commit_in_draw_order: bool = False
    max_queued_events: Positive = 20_000
    max_queued_bytes: Positive = 128 * 1024 * 1024
    max_body_bytes: Positive = 8 * 1024 * 1024
    max_events_per_request: Positive = 1000
    retry_after_s: NonNegative = 0.5


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    stream_writers: StreamWriters
    instance_map: dict[str, InstanceLocation]
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    replication_secret: str | None = None
    replication_secret_path: str | None = None
    instance_name: str | None = None
    sharding: Literal["sha256", "rendezvous"] = "sha256"
    persist: PersistLimits = msgspec.field(default_factory=PersistLimits)
    shutdown_timeout_s: NonNegative = 30.0
    log_level: str = "INFO"  # any case

    def secret(self) -> str:
        path = self.replication_secret_path
        if path is None:
            assert self.replication_secret is not None  # checked by validate()
            return self.replication_secret
        try:
            secret = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"replication_secret_path: cannot read {path}: {exc}") from None
        if not secret:
            raise ConfigError(f"replication_secret_path: {path} holds no secret")
        return secret

    def location(self, instance: str) -> InstanceLocation:
        try:
            return self.instance_map[instance]
        except KeyError:
            raise ConfigError(f"instance {instance!r} is not in instance_map") from None


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if url := environ.get("PERSISTER_DATABASE_URL"):
        overrides["database"] = {"url": url}
    if url := environ.get("PERSISTER_REDIS_URL"):
        overrides["redis"] = {"url": url}
    return merge(raw, overrides)


def config_from_mapping(raw: Mapping[str, Any]) -> Config:
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    validate(config)
    return config


def load_config(paths: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    for path in paths:
        raw = merge(raw, _read_yaml(path))
    raw = _apply_environment(raw, os.environ if environ is None else environ)
    return config_from_mapping(raw)


def validate(config: Config) -> None:
    _validate_pool(config)
    _validate_secret(config.replication_secret, config.replication_secret_path)
    if config.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if urllib.parse.urlsplit(config.redis.url).scheme not in REDIS_SCHEMES:
        raise ConfigError(f"redis.url must start with one of {', '.join(REDIS_SCHEMES)}://")
    _validate_limits(config.persist)


def _validate_pool(config: Config) -> None:
    writers = config.stream_writers.events
    if not writers:
        raise ConfigError("stream_writers.events must name at least one persister")
    if len(set(writers)) != len(writers):
        raise ConfigError("stream_writers.events names a persister twice")
    for writer in writers:
        if writer not in config.instance_map:
            raise ConfigError(
                f"stream_writers.events names {writer!r}, which is not in instance_map"
            )
    for name, location in config.instance_map.items():
        if not 1 <= location.port <= 65535:
            # The listener would wrap it round to another port (70000 -> 4464).
            raise ConfigError(f"instance_map.{name}.port must be 1-65535, not {location.port}")


def _validate_secret(secret: str | None, path: str | None) -> None:
    if secret is None and path is None:
        raise ConfigError("replication_secret (or replication_secret_path) is required")
    if secret is not None and not secret.strip():
        raise ConfigError("replication_secret must not be empty")
    if secret is not None and secret != secret.strip():
        # HTTP drops it from the Authorization header: no client could match.
        raise ConfigError("replication_secret must not begin or end with whitespace")


def _validate_limits(limits: PersistLimits) -> None:
    if limits.max_queued_events < limits.max_events_per_request:
        raise ConfigError(
            "persist.max_queued_events must be at least persist.max_events_per_request"
        )
    if limits.max_queued_bytes < limits.max_body_bytes:
        # Else a request the body limit lets in could never be queued: 503 forever.
        raise ConfigError("persist.max_queued_bytes must be at least persist.max_body_bytes")
