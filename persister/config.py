"""The process's configuration: layered YAML files decoded into Structs.

Operators of Synapse keep one shared file for the whole pool plus one small
file per worker, so `load_config` takes several paths and merges them in
order (later files win, mappings merge key by key). Unknown keys are errors:
a typo in a config file should stop the process, not be ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from persister.errors import PersisterError


class ConfigError(PersisterError):
    """The configuration cannot be used; the message says which key and why."""


class DatabaseConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    url: str = "postgresql://127.0.0.1:5432/persister"
    # Connections each persister opens for writing; rooms are sub-sharded
    # among them so one slow transaction never stalls unrelated rooms.
    writer_connections: int = 2
    connect_timeout_s: float = 5.0


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    channel: str = "persister.replication"


class StreamWriters(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    events: list[str]


class InstanceLocation(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "127.0.0.1"
    port: int = 18101


class PersistLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_batch_events: int = 1000
    # How long an idle lane waits after the first request of a batch for
    # more work to join it. Zero means "send at once".
    max_batch_delay_ms: float = 0.0
    # A lane sends its write only once the writer's lower orderings have
    # finished, so lanes commit in the order they drew: stream lag p99
    # about halves, persist latency p99 grows by about as much again
    # (bench/README.md).
    commit_in_draw_order: bool = False
    max_queued_events: int = 20_000
    max_queued_bytes: int = 128 * 1024 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_events_per_request: int = 1000
    retry_after_s: float = 0.5


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
    shutdown_timeout_s: float = 30.0
    log_level: str = "INFO"

    def secret(self) -> str:
        if self.replication_secret_path is not None:
            return Path(self.replication_secret_path).read_text(encoding="utf-8").strip()
        assert self.replication_secret is not None  # checked by validate()
        return self.replication_secret

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
    if config.replication_secret is None and config.replication_secret_path is None:
        raise ConfigError("replication_secret (or replication_secret_path) is required")
    if config.replication_secret is not None and not config.replication_secret.strip():
        raise ConfigError("replication_secret must not be empty")
    if config.database.writer_connections < 1:
        raise ConfigError("database.writer_connections must be at least 1")
    limits = config.persist
    if limits.max_batch_events < 1 or limits.max_queued_events < limits.max_events_per_request:
        raise ConfigError(
            "persist.max_queued_events must be at least persist.max_events_per_request"
        )
